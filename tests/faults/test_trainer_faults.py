"""The real trainer disrupted, and the secrets kept out of sight (issue 16, faults 2 and 6).

Everything is real: kube-apiserver, kube-controller-manager (the Job controller applies the Job's
podFailurePolicy), the node agent running trainer pods as local processes, the operator as its
own process, versitygw, and QLoRA on a tiny Llama on CPU.

Fault 2: one FineTuneJob (a checkpoint every ``SAVE_STEPS``) loses its trainer pod twice. An S3
proxy in front of versitygw (:class:`S3Gate`) can hold a checkpoint's ``_COMPLETE`` marker PUT, so
the trainer is stopped at a known step however fast the machine trains: every file of that step
written, its marker not. First, past its first complete checkpoint (status shows it), the pod is
deleted (``kubectl delete pod``: SIGTERM) while it uploads its second checkpoint; the upload is let
through, the trainer saves once more and exits 143. Its successor is evicted through the
``pods/eviction`` subresource (what drain does) while its marker is held, with a grace period
(``EVICT_GRACE_S``) that runs out mid-upload: SIGKILL, the marker never lands. The third pod must
delete the incomplete checkpoint, resume from the newest complete one and publish a manifest whose
files match the objects in S3. The Job must count exactly the pods its own podFailurePolicy does
not ignore (an eviction never), and no disruption may lose more than one save interval.

Fault 6: FineTuneJobs with ``model.tokenSecretRef`` (a recognizable fake hub token) and
``storage.credentialsSecretRef`` (the S3 server's real keys) run to failure (invalid dataset, exit
42) and to success after a suspend (SIGTERM during a held checkpoint upload) and resume. Then every
FineTuneJob, Job, Pod and Event version seen by watches, every object of those kinds plus
ConfigMaps, ServiceAccounts, Roles and RoleBindings, the trainers' termination messages, every file
the node agent and the control plane wrote (the operator's and every component's log, the pods'
logs, container specs, termination files and scratch volumes; not the Secret volumes), every
object in S3 and a live trainer's ``/proc/PID/environ`` are scanned for the secret access key and
the hub token, as written and base64-encoded: 0 hits. The scan is shown to find both in the
Secret and in the Secret volume files, and the trainer's environment holds no credential variable.
Run after fault 2 (file order), the scan covers its FineTuneJob too.

Bounded: 3 FineTuneJobs, 6 trainer pods in all, every wait on a condition with a deadline, a
pytest timeout per test; 127.0.0.1 only. The figures in docs/reliability.md come from::

    .venv/bin/pytest tests/faults/test_trainer_faults.py -s -p no:cacheprovider
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import coordinates, wellknown
from kubetune_localenv import stack, tinymodel
from kubetune_localenv.agents import agent_state_dir, container_log, start_agent
from kubetune_localenv.cluster import LocalEnv
from kubetune_operator import names
from kubetune_operator.kube import FINETUNEJOBS, JOBS, PODS, Kube

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Obj = dict[str, Any]

SAVE_STEPS = 4
MAX_STEPS = 16
#: The FineTuneJobs' lifecycle.terminationGracePeriodSeconds: ample for a SIGTERM save here.
GRACE_S = 30
#: The eviction's own grace period (drain --grace-period): shorter than the held upload.
EVICT_GRACE_S = 3
TRAIN_TIMEOUT = 240.0
HUB_TOKEN_SECRET = "hub-token"
RESUMED = re.compile(r"checkpoint: resuming from step (\d+) ")
SIGTERM_LOGGED = "received signal 15: saving a checkpoint and stopping"
DROPPED = re.compile(r"checkpoint: deleting incomplete (\S+) \(no _COMPLETE marker\)")


# --- an S3 proxy that can hold a checkpoint's marker ---------------------------------------------


class S3Gate:
    """A loopback TCP proxy in front of the S3 server that can hold one checkpoint upload.

    Bytes pass through unchanged (so SigV4 signatures stay valid). Armed with a path prefix, it
    holds the first ``PUT <prefix>step-N/_COMPLETE`` request with N >= ``min_step``: the trainer is
    then stuck in the middle of uploading checkpoint N (its files written, its marker not), at a
    known step, for as long as the test likes. :meth:`release` forwards the request (the upload
    completes); :meth:`drop` closes the connection without forwarding it (the marker never lands).
    """

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self._lock = threading.Lock()
        self._pattern: re.Pattern[bytes] | None = None
        self._min_step = 0
        self._held: list[socket.socket] = []
        self._decided = threading.Event()
        self._forward = False
        self.held_step: int | None = None
        threading.Thread(target=self._accept, name="s3gate", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, path_prefix: str, min_step: int = 0) -> None:
        """Hold the next marker PUT of a checkpoint >= ``min_step`` under ``/bucket/key-prefix/``."""
        self.drop()  # a hold left by a failed test
        with self._lock:
            prefix = re.escape(path_prefix.encode())
            self._pattern = re.compile(rb"PUT " + prefix + rb"step-(\d+)/_COMPLETE[ ?]")
            self._min_step = min_step
            self.held_step = None
            self._decided.clear()

    def release(self) -> None:
        """Forward the held request (the upload completes) and pass everything through."""
        self._decide(forward=True)

    def drop(self) -> None:
        """Close the held connection unforwarded and pass everything through from now on."""
        for sock in self._decide(forward=False):
            _close(sock)

    def _decide(self, *, forward: bool) -> list[socket.socket]:
        with self._lock:
            self._pattern = None
            held, self._held = self._held, []
            self._forward = forward
            self._decided.set()
        return held

    def close(self) -> None:
        self.drop()
        _close(self.server)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._client_to_s3, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def _hold(self, data: bytes, client: socket.socket, upstream: socket.socket) -> bool:
        with self._lock:
            match = self._pattern.search(data) if self._pattern and self.held_step is None else None
            if match is None or int(match.group(1)) < self._min_step:
                return False
            self.held_step = int(match.group(1))
            self._held += [client, upstream]
        return True

    def _client_to_s3(self, client: socket.socket, upstream: socket.socket) -> None:
        tail = b""
        try:
            while data := client.recv(65536):
                if self._hold(tail + data, client, upstream):
                    self._decided.wait(300)  # bounded even if the test decides nothing
                    if not self._forward:
                        break
                upstream.sendall(data)
                tail = data[-256:]
        except OSError:
            pass
        _close(upstream)
        _close(client)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    _close(src)
    _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


# --- every version of the objects the tests look back on ------------------------------------------


class Recorder:
    """Cluster-wide watches keeping every version of every FineTuneJob, Job, Pod and Event seen.

    Pods are gone once deleted; their last status (exit code, termination message, the
    DisruptionTarget condition) stays here, and the secret scan reads every version.
    """

    PATHS: Mapping[str, str] = {
        "finetunejobs": f"/apis/{coordinates.API_VERSION}/{coordinates.PLURAL}",
        "jobs": "/apis/batch/v1/jobs",
        "pods": "/api/v1/pods",
        "events": "/api/v1/events",
    }

    def __init__(self, kubeconfig: Path) -> None:
        self.kube = Kube.connect(kubeconfig)
        self._lock = threading.Lock()
        self._seen: dict[str, list[Obj]] = {kind: [] for kind in self.PATHS}
        self._stop = threading.Event()
        for kind, path in self.PATHS.items():
            threading.Thread(target=self._watch, args=(kind, path), name=f"rec-{kind}", daemon=True).start()

    def _add(self, kind: str, obj: Obj) -> None:
        with self._lock:
            self._seen[kind].append(obj)

    def _watch(self, kind: str, path: str) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:  # (re)list: nothing between two watches goes unseen
                    listing = self.kube.request("GET", path)
                    for obj in listing.get("items", []):
                        self._add(kind, obj)
                    version = str(listing["metadata"]["resourceVersion"])
                params = {"resourceVersion": version, "allowWatchBookmarks": "true"}
                for event in self.kube.watch(path, params, timeout_seconds=30):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        version = None
                        break
                    version = str(obj["metadata"]["resourceVersion"])
                    if event.get("type") != "BOOKMARK":
                        self._add(kind, obj)
            except Exception:
                version = None
                self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()

    def versions(self, kind: str) -> list[Obj]:
        with self._lock:
            return list(self._seen[kind])

    def pods_of(self, namespace: str, ftj: str) -> dict[str, list[Obj]]:
        """The versions of each trainer pod of ``ftj``, by uid, oldest pod first."""
        found: dict[str, list[Obj]] = {}
        for pod in self.versions("pods"):
            meta = pod["metadata"]
            if meta["namespace"] == namespace and meta.get("labels", {}).get(names.LABEL_FINETUNEJOB) == ftj:
                found.setdefault(meta["uid"], []).append(pod)
        return dict(sorted(found.items(), key=lambda kv: str(kv[1][0]["metadata"]["creationTimestamp"])))


# --- the environment --------------------------------------------------------------------------------


@dataclass
class Faults:
    env: LocalEnv
    kube: Kube
    gate: S3Gate
    recorder: Recorder
    work: Path
    s3: Any
    hub_token: str
    namespaces: list[str] = field(default_factory=list)
    buckets: list[str] = field(default_factory=list)

    def namespace(self, prefix: str) -> str:
        """A namespace with the S3 credentials Secret and a hub token Secret."""
        namespace = f"{prefix}-{secrets.token_hex(3)}"
        stack.ensure_namespace(self.env, namespace)
        stack.create_credentials_secret(self.env, namespace)
        token = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": HUB_TOKEN_SECRET, "namespace": namespace},
            "stringData": {"token": self.hub_token},
        }
        self.env.kubectl("apply", "-f", "-", input=json.dumps(token))
        self.namespaces.append(namespace)
        return namespace

    def bucket(self) -> str:
        bucket = "faults-" + secrets.token_hex(4)
        stack.upload_tiny_inputs(self.env, bucket, self.work)
        self.buckets.append(bucket)
        return bucket

    def apply(
        self, namespace: str, name: str, bucket: str, *, endpoint: str | None = None, **spec: Any
    ) -> stack.TinyJob:
        """The tiny FineTuneJob, with both Secret references, the grace period and ``spec`` merged in."""
        job = stack.render_tiny_job(
            self.env,
            name=name,
            namespace=namespace,
            bucket=bucket,
            max_steps=MAX_STEPS,
            save_steps=SAVE_STEPS,
        )
        manifest = yaml.safe_load(job.manifest)
        body = manifest["spec"]
        body["model"]["tokenSecretRef"] = {"name": HUB_TOKEN_SECRET, "key": "token"}
        body["lifecycle"]["terminationGracePeriodSeconds"] = GRACE_S
        if endpoint is not None:
            body["storage"]["endpoint"] = endpoint
        for section, values in spec.items():
            body.setdefault(section, {}).update(values)
        self.env.kubectl("apply", "-f", "-", input=json.dumps(manifest))
        return job

    def ftj(self, namespace: str, name: str) -> Obj:
        obj = self.kube.get(FINETUNEJOBS, namespace, name)
        assert obj is not None, f"FineTuneJob {namespace}/{name} is gone"
        return obj

    def finished(self, job: stack.TinyJob, timeout: float = TRAIN_TIMEOUT) -> Obj:
        def done() -> Obj | None:
            obj = self.ftj(job.namespace, job.name)
            return obj if obj.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

        result: Obj = stack.wait_for(f"{job.name} to finish", done, timeout, interval=0.5)
        return result

    def running_pod(self, job: stack.TinyJob, not_uids: set[str], timeout: float = TRAIN_TIMEOUT) -> Obj:
        """The trainer pod of ``job`` whose container runs (a pod not in ``not_uids``)."""
        selector = f"{names.LABEL_FINETUNEJOB}={job.name}"

        def running() -> Obj | None:
            for pod in self.kube.list(PODS, job.namespace, selector):
                statuses = pod.get("status", {}).get("containerStatuses") or []
                if pod["metadata"]["uid"] not in not_uids and any("running" in s["state"] for s in statuses):
                    return pod
            return None

        pod: Obj = stack.wait_for(f"a running trainer pod of {job.name}", running, timeout, interval=0.5)
        return pod

    def gone(self, pod: Obj, timeout: float = 120.0) -> None:
        meta = pod["metadata"]

        def absent() -> bool:
            current = self.kube.get(PODS, meta["namespace"], meta["name"])
            return current is None or current["metadata"]["uid"] != meta["uid"]

        stack.wait_for(f"pod {meta['name']} to be gone", absent, timeout, interval=0.5)

    def wait_log(self, pod: Obj, text: str, timeout: float = 60.0) -> None:
        """Until the trainer log of ``pod`` says ``text``."""
        stack.wait_for(f"{text!r} in the trainer log", lambda: text in self.log(pod), timeout, interval=0.2)

    def log(self, pod: Obj) -> str:
        return container_log(self.env, pod, names.TRAINER_CONTAINER)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faults]:
    """A control plane of its own with a node agent, the operator, an S3 gate and the watches."""
    env = LocalEnv(tmp_path_factory.mktemp("trainer-faults"))
    env.extra_start.append(lambda e: start_agent(e, gpus=0))
    env.start()
    gate: S3Gate | None = None
    recorder: Recorder | None = None
    try:
        assert env.s3 is not None
        stack.install_crd(env)
        recorder = Recorder(env.kubeconfig)
        stack.start_operator(env)
        gate = S3Gate(env.s3.endpoint)
        hub_token = "hf_kubetuneFAKE" + secrets.token_hex(16)
        work = tmp_path_factory.mktemp("trainer-faults-work")
        yield Faults(env, Kube.connect(env.kubeconfig), gate, recorder, work, stack.s3_client(env), hub_token)
    finally:
        if recorder is not None:
            recorder.stop()
        if gate is not None:
            gate.close()
        env.stop()


# --- S3 and the Job's podFailurePolicy ---------------------------------------------------------------


def _terminated(pod: Obj) -> Obj:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status["name"] == names.TRAINER_CONTAINER and "terminated" in status["state"]:
            term: Obj = status["state"]["terminated"]
            return term
    return {}


def _last_terminated(versions: list[Obj]) -> tuple[Obj, Obj]:
    """The pod's last version with its trainer terminated, and that terminated state."""
    for pod in reversed(versions):
        if term := _terminated(pod):
            return pod, term
    raise AssertionError(f"pod {versions[-1]['metadata']['name']} never reported its trainer's end")


def _condition(pod: Obj, kind: str) -> Obj | None:
    return next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == kind), None)


def _rule_matches(rule: Mapping[str, Any], pod: Obj, term: Obj) -> bool:
    """The Job controller's podFailurePolicy matching, for one failed pod."""
    codes = rule.get("onExitCodes")
    if codes is not None:
        if codes.get("containerName") not in (None, names.TRAINER_CONTAINER):
            return False
        code = int(term.get("exitCode", 0))
        inside = code in codes["values"]
        return code != 0 and (inside if codes["operator"] == "In" else not inside)
    for wanted in rule.get("onPodConditions") or []:
        found = _condition(pod, wanted["type"])
        if found is not None and found.get("status") == wanted.get("status", "True"):
            return True
    return False


def _ignored_by_policy(policy: Mapping[str, Any], pod: Obj, term: Obj) -> bool:
    """True when the first matching rule says Ignore: the pod does not count against backoffLimit."""
    for rule in policy.get("rules") or []:
        if _rule_matches(rule, pod, term):
            return bool(rule["action"] == "Ignore")
    return False


def _evict(kube: Kube, pod: Obj, grace: int) -> None:
    """What ``kubectl drain --grace-period`` does for one pod: the pods/eviction subresource."""
    meta = pod["metadata"]
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
        "deleteOptions": {"gracePeriodSeconds": grace, "preconditions": {"uid": meta["uid"]}},
    }
    kube.request("POST", PODS.path(meta["namespace"], meta["name"], "eviction"), body)


def _resumed_from(log: str) -> int | None:
    found = RESUMED.findall(log)
    return int(found[-1]) if found else None


@pytest.mark.timeout(480)
def test_trainer_pod_deleted_then_evicted_mid_upload_resumes_and_publishes_a_valid_manifest(
    faults: Faults,
) -> None:
    started = time.monotonic()
    namespace = faults.namespace("disrupt")
    bucket = faults.bucket()
    prefix = "adapters/preempted"
    checkpoints = f"/{bucket}/{prefix}/checkpoints/"
    faults.gate.arm(checkpoints, min_step=2 * SAVE_STEPS)
    job = faults.apply(namespace, "preempted", bucket, endpoint=faults.gate.endpoint)
    assert job.output_prefix == prefix

    # 1. Past the first complete checkpoint, a plain delete: SIGTERM, the trainer saves and stops.
    #    The gate holds the second checkpoint's marker, so the delete meets the trainer at a known
    #    step however fast this machine trains; the upload is let through once SIGTERM has landed.
    first = faults.running_pod(job, set())
    step_at_delete: int = stack.wait_for(
        "the trainer to reach its second checkpoint",
        lambda: faults.gate.held_step,
        TRAIN_TIMEOUT,
        interval=0.2,
    )

    def status_checkpoint() -> bool:
        progress = faults.ftj(namespace, job.name).get("status", {}).get("progress") or {}
        return str(progress.get("lastCheckpoint", "")).endswith(f"/step-{SAVE_STEPS}")

    stack.wait_for("status to show the first complete checkpoint", status_checkpoint, 30, interval=0.3)
    faults.env.kubectl("delete", "pod", first["metadata"]["name"], "-n", namespace, "--wait=false")
    deleted_at = time.monotonic()
    faults.wait_log(first, SIGTERM_LOGGED)
    faults.gate.release()
    faults.gone(first, timeout=GRACE_S + 30)

    # 2. The next pod's first checkpoint upload is held before its marker, then the pod is evicted
    #    with a grace period shorter than the held upload: SIGKILL mid-upload.
    faults.gate.arm(checkpoints)
    second = faults.running_pod(job, {first["metadata"]["uid"]})
    replaced_after = {"delete": time.monotonic() - deleted_at}
    held: int = stack.wait_for(
        "the checkpoint upload to be held", lambda: faults.gate.held_step, TRAIN_TIMEOUT, interval=0.2
    )
    partial = stack.folder_objects(faults.s3, bucket, f"{prefix}/checkpoints/step-{held}")
    assert partial, f"step {held} has no files in S3: the hold came before the upload"
    assert wellknown.CHECKPOINT_MARKER not in partial, sorted(partial)
    _evict(faults.kube, second, EVICT_GRACE_S)
    evicted_at = time.monotonic()
    faults.gone(second, timeout=EVICT_GRACE_S + 60)
    faults.gate.drop()
    kept = stack.folder_objects(faults.s3, bucket, f"{prefix}/checkpoints")
    complete = sorted(
        int(k.split("/")[0].split("-")[1]) for k in kept if k.endswith(f"/{wellknown.CHECKPOINT_MARKER}")
    )
    assert complete, sorted(kept)
    assert held not in complete, sorted(kept)
    faults.running_pod(job, {first["metadata"]["uid"], second["metadata"]["uid"]})
    replaced_after["eviction"] = time.monotonic() - evicted_at

    # 3. The third pod resumes from the newest complete checkpoint and publishes.
    done = faults.finished(job)
    status = done["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == MAX_STEPS

    pods = faults.recorder.pods_of(namespace, job.name)
    assert len(pods) == 3, f"expected 3 trainer pods (delete, eviction, success), saw {len(pods)}"
    (first_v, second_v, third_v) = pods.values()
    logs = [faults.log(versions[-1]) for versions in (first_v, second_v, third_v)]

    # The deleted pod saved on SIGTERM and its successor resumed from exactly that save.
    _, first_term = _last_terminated(first_v)
    assert first_term["exitCode"] == 143, first_term
    summary = json.loads(first_term["message"])
    assert summary["phase"] == "Interrupted", summary
    first_reached = int(summary["lastCheckpointStep"])
    second_resumed = _resumed_from(logs[1])
    assert second_resumed == first_reached > step_at_delete, (second_resumed, first_reached, step_at_delete)
    assert second_resumed >= step_at_delete - SAVE_STEPS

    # The evicted pod: DisruptionTarget set by the API server (kept by the node agent's status
    # patches), killed mid-upload; the incomplete step was deleted, never resumed from.
    second_pod, second_term = _last_terminated(second_v)
    disruption = _condition(second_pod, "DisruptionTarget")
    assert disruption is not None, second_pod["status"]
    assert disruption["status"] == "True", disruption
    assert disruption.get("reason") == "EvictionByEvictionAPI", disruption
    assert second_term["exitCode"] == 137, second_term  # the grace period ended mid-upload
    third_resumed = _resumed_from(logs[2])
    assert third_resumed is not None, logs[2][-3000:]
    assert third_resumed == complete[-1], (third_resumed, complete)  # the newest complete one
    assert held - SAVE_STEPS <= third_resumed < held, (third_resumed, held)
    dropped = DROPPED.findall(logs[2])
    assert any(uri.endswith(f"/checkpoints/step-{held}") for uri in dropped), dropped
    assert all(f"resuming from step {held} " not in text for text in logs), "resumed from the incomplete step"

    # The Job counted exactly the pods its podFailurePolicy does not ignore; never the eviction.
    trainer_job = faults.kube.get(JOBS, namespace, names.job_name(job.name))
    assert trainer_job is not None
    policy = trainer_job["spec"]["podFailurePolicy"]
    ignored = [
        _ignored_by_policy(policy, pod, term)
        for pod, term in (_last_terminated(first_v), _last_terminated(second_v))
    ]
    assert ignored[1], "the evicted pod (DisruptionTarget) must not count against backoffLimit"
    job_status = trainer_job["status"]
    assert job_status.get("succeeded") == 1, job_status
    assert int(job_status.get("failed") or 0) == ignored.count(False), (job_status, ignored)

    # The manifest lists every published file, with sizes and sha256s matching the objects.
    manifest = json.loads(stack.object_bytes(faults.s3, bucket, f"{prefix}/{wellknown.MANIFEST}"))
    assert manifest["outputUri"] == f"s3://{bucket}/{prefix}"
    listed = {entry["path"]: entry for entry in manifest["files"]}
    stored = stack.folder_objects(faults.s3, bucket, prefix)
    published = {key for key in stored if not key.startswith(f"{wellknown.CHECKPOINTS_DIR}/")}
    assert set(listed) == published - {wellknown.MANIFEST}, (sorted(listed), sorted(published))
    for path, entry in listed.items():
        data = stack.object_bytes(faults.s3, bucket, f"{prefix}/{path}")
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"]), path
    assert "adapter_model.safetensors" in listed
    metrics = json.loads(stack.object_bytes(faults.s3, bucket, f"{prefix}/{wellknown.METRICS}"))
    assert metrics["resumedFromStep"] == third_resumed
    assert metrics["globalStep"] == MAX_STEPS

    lost = {"delete": first_reached - second_resumed, "eviction mid-upload": held - third_resumed}
    assert all(0 <= steps <= SAVE_STEPS for steps in lost.values()), lost
    print(
        f"\ntrainer faults: 3 pods (delete at step {step_at_delete}, saved {first_reached}, resumed "
        f"{second_resumed}; eviction holding the step-{held} marker, resumed {third_resumed}); steps "
        f"lost {lost} (saveSteps {SAVE_STEPS}); Job failed={job_status.get('failed') or 0} "
        f"(ignored by podFailurePolicy: delete={ignored[0]}, eviction={ignored[1]}); "
        f"{len(listed)} manifest files verified; replacement pod running after "
        f"{ {k: round(v, 1) for k, v in replaced_after.items()} }s; {time.monotonic() - started:.0f}s"
    )


# --- the secret scan ---------------------------------------------------------------------------------


@dataclass
class Scan:
    """Counts, per source, what was scanned and where a needle was found."""

    needles: Mapping[str, bytes]
    items: dict[str, int] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)

    @classmethod
    def for_values(cls, values: Mapping[str, str]) -> Scan:
        needles: dict[str, bytes] = {}
        for label, value in values.items():
            needles[label] = value.encode()
            needles[f"{label} (base64)"] = base64.b64encode(value.encode())
        return cls(needles)

    def found(self, data: bytes) -> list[str]:
        return [label for label, needle in self.needles.items() if needle in data]

    def add(self, source: str, what: str, data: bytes) -> None:
        self.items[source] = self.items.get(source, 0) + 1
        self.size[source] = self.size.get(source, 0) + len(data)
        self.hits += [f"{source}: {what}: {label}" for label in self.found(data)]

    def add_json(self, source: str, what: str, obj: Any) -> None:
        self.add(source, what, json.dumps(obj).encode())

    def table(self) -> str:
        rows = [f"  {s:<34} {self.items[s]:>6} items {self.size[s]:>11} bytes" for s in sorted(self.items)]
        return "\n".join(rows)


def _trainer_processes(namespace: str, name: str) -> list[tuple[int, dict[str, str]]]:
    """(pid, environment) of each live trainer process of this FineTuneJob, read from /proc."""
    wanted = {wellknown.ENV_JOB_NAME: name, wellknown.ENV_JOB_NAMESPACE: namespace}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"kubetune_trainer" not in cmdline:
            continue
        environ = dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)
        if all(environ.get(k) == v for k, v in wanted.items()):
            found.append((int(entry.name), environ))
    return found


def _files(root: Path, skip: Callable[[Path], bool]) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and not skip(path):
            yield path


SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}


@pytest.mark.timeout(420)
def test_no_secret_in_status_events_logs_configmaps_specs_environment_or_outputs(faults: Faults) -> None:
    started = time.monotonic()
    env = faults.env
    assert env.s3 is not None
    scan = Scan.for_values({"S3 secret key": env.s3.secret_key, "hub token": faults.hub_token})
    namespace = faults.namespace("secrets")
    bucket = faults.bucket()
    good = tinymodel.to_jsonl(tinymodel.chat_records(8)).decode().splitlines()
    broken = [*good[:2], '{"messages": [{"role": "user"}]}', *good[2:]]
    faults.s3.put_object(Bucket=bucket, Key="datasets/broken/train.jsonl", Body="\n".join(broken).encode())

    # A run that fails (invalid dataset: exit 42) and one suspended and resumed to success.
    bad = faults.apply(
        namespace, "bad-data", bucket, dataset={"train": f"s3://{bucket}/datasets/broken/train.jsonl"}
    )
    # The gate holds the first checkpoint's marker: the trainer stays alive (and mid-run) while
    # its process is inspected, however fast this machine trains.
    faults.gate.arm(f"/{bucket}/adapters/pausable/checkpoints/", min_step=SAVE_STEPS)
    pausable = faults.apply(
        namespace, "pausable", bucket, endpoint=faults.gate.endpoint, training={"maxSteps": 12}
    )
    pod = faults.running_pod(pausable, set())
    stack.wait_for("the first checkpoint upload", lambda: faults.gate.held_step, TRAIN_TIMEOUT, interval=0.2)

    # The live trainer: no secret in its environment (/proc) or in the node agent's container spec;
    # the secrets are files in its Secret volumes (where the scan must find them: it works).
    processes = _trainer_processes(namespace, pausable.name)
    assert processes, "no live trainer process found in /proc"
    for pid, environ in processes:
        assert not SECRET_ENV_NAMES & set(environ), sorted(environ)
        assert (
            environ.get(wellknown.ENV_HUB_TOKEN_PATH)
            == f"{wellknown.HUB_TOKEN_DIR}/{wellknown.HUB_TOKEN_FILE}"
        )
        scan.add(
            "trainer /proc/PID/environ", str(pid), "\0".join(f"{k}={v}" for k, v in environ.items()).encode()
        )
    pod_dir = agent_state_dir(env) / "pods" / f"{namespace}_{pod['metadata']['name']}"
    spec_file = pod_dir / "run" / f"{names.TRAINER_CONTAINER}.json"
    container_spec = json.loads(spec_file.read_text())
    assert not SECRET_ENV_NAMES & set(container_spec["env"]), sorted(container_spec["env"])
    scan.add("node agent container spec", str(spec_file), spec_file.read_bytes())
    secret_files = [p for p in (pod_dir / "volumes").rglob("*") if p.is_file() and scan.found(p.read_bytes())]
    assert {p.name for p in secret_files} >= {wellknown.SECRET_ACCESS_KEY_FILE, wellknown.HUB_TOKEN_FILE}, (
        secret_files
    )
    secret_json = env.kubectl("get", "secret", "-n", namespace, "-o", "json").encode()
    assert {"S3 secret key (base64)", "hub token (base64)"} <= set(scan.found(secret_json))

    # Suspend (SIGTERM: the trainer lets the upload finish, saves once more and stops), resume.
    patch = json.dumps({"spec": {"suspend": True}})
    env.kubectl("patch", "ftj", pausable.name, "-n", namespace, "--type=merge", "-p", patch)
    faults.wait_log(pod, SIGTERM_LOGGED)
    faults.gate.release()
    faults.gone(pod, timeout=GRACE_S + 60)
    stack.wait_for(
        "phase Suspended",
        lambda: faults.ftj(namespace, pausable.name).get("status", {}).get("phase") == "Suspended",
        60,
        interval=0.5,
    )
    patch = json.dumps({"spec": {"suspend": False}})
    env.kubectl("patch", "ftj", pausable.name, "-n", namespace, "--type=merge", "-p", patch)
    assert faults.finished(pausable)["status"]["phase"] == "Succeeded"
    resumed = [
        _resumed_from(faults.log(v[-1])) for v in faults.recorder.pods_of(namespace, pausable.name).values()
    ]
    assert resumed == [None, SAVE_STEPS + 1], resumed  # the second pod resumed from the SIGTERM save
    failed = faults.finished(bad)["status"]
    assert (failed["phase"], failed.get("reason"), failed.get("exitCode")) == (
        "Failed",
        "InvalidDataset",
        42,
    ), failed

    # The Jobs and pods: the secrets reach the trainer only as Secret volumes, never env.
    for trainer_job in faults.kube.list(JOBS, namespace):
        for container in trainer_job["spec"]["template"]["spec"]["containers"]:
            assert not SECRET_ENV_NAMES & {e["name"] for e in container.get("env") or []}
            assert all("secretKeyRef" not in (e.get("valueFrom") or {}) for e in container.get("env") or [])
            assert not any("secretRef" in source for source in container.get("envFrom") or [])

    # Everything the API server holds (but the Secrets), as watched and as it is now.
    for kind in Recorder.PATHS:
        for obj in faults.recorder.versions(kind):
            scan.add_json(f"api: {kind} (every version)", obj["metadata"]["name"], obj)
    kinds = "finetunejobs,jobs,pods,configmaps,events,serviceaccounts,roles,rolebindings"
    for obj in json.loads(env.kubectl("get", kinds, "-A", "-o", "json"))["items"]:
        scan.add_json(f"api: {obj['kind']} (now)", obj["metadata"]["name"], obj)
    messages = sorted(
        {
            (p["metadata"]["uid"], _terminated(p)["message"])
            for p in faults.recorder.versions("pods")
            if _terminated(p).get("message")
        }
    )
    for uid, message in messages:
        scan.add("termination messages", uid, message.encode())

    # Every file the control plane, the operator and the node agent wrote (but the Secret volumes:
    # those must hold the secrets) and every object in S3.
    secret_volumes = {"storage-credentials", "hub-token"}

    def secret_volume(path: Path) -> bool:
        parts = path.parts
        return any(a == "volumes" and b in secret_volumes for a, b in itertools.pairwise(parts))

    for path in _files(env.logs_dir, lambda p: False):
        scan.add(f"log: {path.name}", str(path), path.read_bytes())
    for path in _files(agent_state_dir(env), secret_volume):
        source = "node agent: pod logs" if path.suffix == ".log" else "node agent: pod files"
        scan.add(source, str(path), path.read_bytes())
    scanned_keys = set()
    for name in faults.buckets:
        for key in stack.folder_objects(faults.s3, name, ""):
            source = "s3: outputs" if key.startswith("adapters/") else "s3: inputs"
            scan.add(source, f"{name}/{key}", stack.object_bytes(faults.s3, name, key))
            scanned_keys.add(f"{name}/{key}")
    published = {wellknown.MANIFEST, wellknown.METRICS, wellknown.RESOLVED_CONFIG, wellknown.MODEL_CARD}
    assert {f"{bucket}/adapters/pausable/{name}" for name in published} <= scanned_keys

    took = time.monotonic() - started
    print(f"\nsecret scan ({took:.0f}s), {len(messages)} termination messages:\n{scan.table()}")
    print(f"hits: {len(scan.hits)}")
    assert scan.items.get("node agent: pod logs", 0) >= 3
    assert scan.items.get("s3: outputs", 0) > 0
    assert not scan.hits, "\n".join(scan.hits)
