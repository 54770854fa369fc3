"""One pod on the node agent's node, from admission to deletion: a :class:`PodWorker` thread.

The thread prepares the volumes, runs the init containers in order, then the containers, applies
the restart policy, and on deletion stops them (SIGTERM, grace, SIGKILL). It starts the container
processes, so it also must outlive them: ``PR_SET_PDEATHSIG`` fires when the *thread* that forked
a child exits, not only when the agent process does. Mounts (:mod:`.mounts`), processes
(:mod:`.containers`) and status reporting (:mod:`.podstatus`) are the worker's helpers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from kubetune_api.status import rfc3339
from kubetune_operator.kube import Kube, KubeError

from . import containers, images, oci
from .cgroup import MemoryCgroups
from .containers import ContainerRun
from .mounts import PodDir, chown_termination_file, container_mounts, oci_mounts, set_volume_ownership
from .podspec import NotReadyError, PodSpecResolver, expand
from .podstatus import PodState, StatusReporter, is_finished

JSON = dict[str, Any]
RETRY_SECONDS = 2.0
IMAGE_RETRY_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0
#: What a call to the API server raises: an error answer, or none (refused, reset, timed out:
#: a restarting API server). Both are retried; neither may end the worker, whose cleanup kills
#: the pod's containers.
API_ERRORS = (KubeError, urllib3.exceptions.HTTPError)

log = logging.getLogger("nodeagent")


@dataclass
class AgentContext:
    """What every pod worker needs from the agent."""

    kube: Kube
    node_name: str
    state_dir: Path
    image_table: Callable[[], list[images.ImageRule]]
    node: Callable[[], JSON]
    restart_backoff: float = 10.0
    cgroups: MemoryCgroups | None = None
    #: OCI mode (images from the store, run by crun with the security context); None: processes.
    oci: containers.OciRuntime | None = None


class PodWorker(threading.Thread):
    """Runs one pod: volumes, init containers in order, then the containers."""

    def __init__(self, ctx: AgentContext, pod: JSON, *, lost: bool = False) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.pod = pod
        self.uid = str(meta["uid"])
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.dir = PodDir(ctx.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}", self.uid)
        self.lost = lost
        self.wake = threading.Event()
        self.finished = threading.Event()
        self.stop_grace: float | None = None
        self.delete_object = True
        self.restart_policy = str(spec.get("restartPolicy") or "Always")
        init_runs = [ContainerRun(c, init=True) for c in spec.get("initContainers") or []]
        self.state = PodState(
            init_runs=init_runs,
            runs=[ContainerRun(c, init=False) for c in spec.get("containers") or []],
            start_time=str(pod.get("status", {}).get("startTime") or rfc3339()),
            initialized=not init_runs,
        )
        self.reporter = StatusReporter(ctx.kube, meta["namespace"], meta["name"], self.uid)
        self.resolver = PodSpecResolver(ctx.kube, pod, ctx.node(), ctx.kube.port)
        self.volumes: dict[str, tuple[Path, bool]] = {}

    @property
    def all_runs(self) -> list[ContainerRun]:
        return [*self.state.init_runs, *self.state.runs]

    # -- called by the agent -----------------------------------------------------
    def update(self, pod: JSON) -> None:
        self.pod = pod
        self.resolver.pod = pod
        self.wake.set()

    def request_stop(self, grace: float, *, delete_object: bool = True, shutdown: bool = False) -> None:
        """Terminate the containers (SIGTERM, ``grace`` seconds, SIGKILL), then finish."""
        # The flags first: the worker acts as soon as it sees stop_grace.
        self.delete_object = self.delete_object and delete_object
        self.state.shutdown = self.state.shutdown or shutdown
        if self.stop_grace is None or grace < self.stop_grace:
            self.stop_grace = grace
        self.wake.set()

    # -- the thread ----------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod %s: worker failed", self.key)
        finally:
            for run in self.all_runs:
                containers.kill(run)
            self.finished.set()

    def _run(self) -> None:
        self.dir.prepare()
        if self.lost:
            self._mark_lost()
        elif any(c.get("restartPolicy") == "Always" for c in self.pod["spec"].get("initContainers") or []):
            self.state.failure = ("UnsupportedPodSpec", "the node agent does not run sidecar containers")
        while self.stop_grace is None and self.state.failure is None and not is_finished(self.state):
            if not self.state.volumes_ready:
                self._prepare_volumes()
            else:
                self._step()
            self._publish()
            self.wake.wait(0.2 if self.state.volumes_ready else RETRY_SECONDS)
            self.wake.clear()
        self._publish()
        while self.stop_grace is None:
            self.wake.wait(1.0)
            self.wake.clear()
        if is_finished(self.state):
            self.state.shutdown = False  # a finished pod keeps its phase when the agent stops
        self._terminate(self.stop_grace)
        self._publish(final=True)
        if self.delete_object:
            self._delete_object()
        self.dir.cleanup()

    def _publish(self, *, final: bool = False) -> None:
        if not self.reporter.publish(self.state, final=final):
            self.request_stop(0, delete_object=False)  # the pod is gone (or replaced)

    # -- steps ---------------------------------------------------------------------
    def _prepare_volumes(self) -> None:
        try:
            self.volumes = self.resolver.write_volumes(self.dir.volumes)
        except NotReadyError as exc:
            message = f"MountVolume.SetUp failed: {exc.message}"
            for run in self.all_runs:
                run.state = {"waiting": {"reason": "ContainerCreating", "message": message}}
            return
        except API_ERRORS as exc:
            log.warning("pod %s: volumes: %s", self.key, exc)
            return
        if self.ctx.oci is not None:
            fs_group = (self.pod["spec"].get("securityContext") or {}).get("fsGroup")
            set_volume_ownership(self.volumes, self.dir, None if fs_group is None else int(fs_group))
        self.state.volumes_ready = True
        reason = "PodInitializing" if not self.state.initialized else "ContainerCreating"
        for run in self.all_runs:
            run.state = {"waiting": {"reason": reason}}

    def _step(self) -> None:
        try:
            self.resolver.refresh_tokens()
        except API_ERRORS as exc:
            log.warning("pod %s: token refresh: %s", self.key, exc)
        if not self.state.initialized:
            self._step_init()
            if not self.state.initialized:
                return
        for run in self.state.runs:
            self._advance(run)

    def _step_init(self) -> None:
        for run in self.state.init_runs:
            if run.terminated is not None and run.terminated.get("exitCode") == 0:
                continue
            self._advance(run)
            term = run.terminated
            if term is not None and term.get("exitCode") != 0:
                self.state.failure = ("", f"init container {run.name} failed")
            return
        self.state.initialized = True

    def _advance(self, run: ContainerRun) -> None:
        """Start, poll or restart one container."""
        if run.popen is not None:
            if run.popen.poll() is None:
                return
            self._record_exit(run)
        if run.terminated is not None or time.monotonic() < run.next_start:
            return  # finished for good, or waiting for its (re)start time
        if run.restart_pending:
            run.restart_count += 1
            run.restart_pending = False
        self._start(run)

    def _should_restart(self, run: ContainerRun) -> bool:
        if self.state.terminating or self.stop_grace is not None:
            return False
        if self.restart_policy == "Always" and not run.init:
            return True
        return self.restart_policy != "Never" and (run.terminated or {}).get("exitCode") != 0

    # -- containers ------------------------------------------------------------------
    @staticmethod
    def _pull_failed(run: ContainerRun, why: str) -> None:
        image = str(run.spec.get("image", ""))
        run.pull_failures += 1
        reason = "ErrImagePull" if run.pull_failures == 1 else "ImagePullBackOff"
        message = f'Failed to pull image "{image}": {why}'
        if reason == "ImagePullBackOff":
            message = f'Back-off pulling image "{image}": {message}'
        run.wait(reason, message, IMAGE_RETRY_SECONDS)

    def _image_rule(self, run: ContainerRun) -> images.ImageRule | None:
        """The image table's rule for the container's image; waiting (ErrImagePull) when none."""
        image = str(run.spec.get("image", ""))
        rule = images.resolve(self.ctx.image_table(), image)
        if rule is None:
            self._pull_failed(
                run, f'no rule for "{images.normalize(image)}" in the node agent\'s image table'
            )
        return rule

    def _start(self, run: ContainerRun) -> None:
        if self.ctx.oci is not None:
            self._start_oci(run, self.ctx.oci)
            return
        rule = self._image_rule(run)
        if rule is None:
            return
        run.image_id = f"nodeagent://{rule.match}"
        hostname = str(self.pod["spec"].get("hostname") or self.pod["metadata"]["name"])
        base = {"PATH": rule.path_env(), "HOME": str(self.dir.home), "HOSTNAME": hostname, **rule.env}
        try:
            env = self.resolver.container_env(run.spec, base)
            mounts = container_mounts(run.spec, self.volumes, rule, self.dir)
        except NotReadyError as exc:
            run.wait("CreateContainerConfigError", exc.message, RETRY_SECONDS)
            return
        except API_ERRORS as exc:
            run.wait("CreateContainerConfigError", str(exc), RETRY_SECONDS)
            return
        argv = _argv(run, rule, env)
        if not argv:
            image = run.spec.get("image", "")
            message = f"no command specified for container {run.name!r} (and no entrypoint for {image})"
            run.wait("CreateContainerError", message, MAX_BACKOFF_SECONDS)
            return
        cwd = str(run.spec.get("workingDir") or rule.working_dir or self.dir.home)
        cgroup = containers.attach_memory_cgroup(run, self.dir, self.ctx.cgroups)
        containers.spawn(run, self.dir, argv, env, mounts=mounts, cwd=cwd, cgroup_procs=cgroup)
        log.info("pod %s: started container %s (pid %s): %s", self.key, run.name, run.container_id, argv)

    def _start_oci(self, run: ContainerRun, rt: containers.OciRuntime) -> None:
        """OCI mode: the image's root filesystem and config, the pod's security context, crun."""
        image = rt.store.lookup(str(run.spec.get("image", "")))
        if image is None:
            self._pull_failed(run, f"not in the node agent's image store {rt.store.root} (make images)")
            return
        rule = images.ImageRule(
            match=image.name,
            env=image.env,
            entrypoint=image.entrypoint,
            cmd=image.cmd,
            working_dir=image.working_dir,
        )
        run.image_id = f"sha256:{image.id}"
        hostname = str(self.pod["spec"].get("hostname") or self.pod["metadata"]["name"])
        try:
            who = oci.identity(self.pod, run.spec, image)
            env = self.resolver.container_env(
                run.spec, {"PATH": images.BASE_PATH, **image.env, "HOSTNAME": hostname}
            )
            env.setdefault("HOME", who.home)
            mounts = oci_mounts(run.spec, self.volumes, self.dir, hostname)
            argv = _argv(run, rule, env)
            cwd = str(run.spec.get("workingDir") or image.working_dir or "/")
            process = oci.Process(argv=argv, env=env, cwd=cwd, hostname=hostname)
            config = oci.runtime_config(
                self.pod, run.spec, who, process, mounts=mounts, seccomp_root=rt.seccomp_root
            )
        except NotReadyError as exc:
            run.wait(exc.reason, exc.message, RETRY_SECONDS)
            return
        except API_ERRORS as exc:
            run.wait("CreateContainerConfigError", str(exc), RETRY_SECONDS)
            return
        if not argv:
            run.wait(
                "CreateContainerError",
                f"no command specified for container {run.name!r}",
                MAX_BACKOFF_SECONDS,
            )
            return
        chown_termination_file(run.spec, self.dir, who.uid)
        helper_argv, oci_spec = containers.oci_bundle(run, self.dir, rt, config, image.layers)
        cgroup = containers.attach_memory_cgroup(run, self.dir, self.ctx.cgroups)
        helper_env = {"PATH": images.BASE_PATH}
        containers.spawn(
            run, self.dir, helper_argv, helper_env, mounts=[], cwd="/", cgroup_procs=cgroup, oci=oci_spec
        )
        log.info(
            "pod %s: started container %s (%s, uid %d) in %s: %s",
            self.key,
            run.name,
            run.container_id,
            who.uid,
            image.name,
            argv,
        )

    def _record_exit(self, run: ContainerRun) -> None:
        term = containers.collect_exit(run, self.dir, self.ctx.cgroups)
        run.state = {"terminated": term}
        log.info("pod %s: container %s exited: %s", self.key, run.name, term.get("exitCode"))
        if self._should_restart(run):
            ran_for = time.monotonic() - run.started_mono
            delay = 0.0 if ran_for > 600 else self.ctx.restart_backoff * 2 ** min(run.restart_count, 10)
            delay = min(delay, MAX_BACKOFF_SECONDS)
            run.last_state = {"terminated": term}
            message = f"back-off {delay:.0f}s restarting failed container={run.name} pod={self.key}"
            run.wait("CrashLoopBackOff", message, delay)
            run.restart_pending = True

    # -- termination ---------------------------------------------------------------
    def _terminate(self, grace: float) -> None:
        self.state.terminating = True
        running = [r for r in self.all_runs if r.popen is not None]
        containers.stop(running, grace, self.key)
        for run in running:
            if run.popen is not None:
                self._record_exit(run)

    def _mark_lost(self) -> None:
        message = "The container could not be located when the pod was terminated"
        for run in self.all_runs:
            run.state = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": message,
                    "finishedAt": rfc3339(),
                }
            }
        self.state.failure = ("ContainerStatusUnknown", "the node agent restarted while the pod was running")

    def _delete_object(self) -> None:
        meta = self.pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        try:
            self.ctx.kube.request("DELETE", path, body)
        except KubeError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s: delete: %s", self.key, exc)
        except urllib3.exceptions.HTTPError as exc:  # the agent deletes it once it sees it again
            log.warning("pod %s: delete: %s", self.key, exc)


def _argv(run: ContainerRun, rule: images.ImageRule, env: dict[str, str]) -> list[str]:
    """The container's command: its own command and args, else the image's entrypoint and cmd."""
    command = run.spec.get("command")
    args = run.spec.get("args")
    argv = (
        [*command, *(args or [])]
        if command
        else [*rule.entrypoint, *(args if args is not None else rule.cmd)]
    )
    return [expand(str(a), env) for a in argv]
