"""Kueue for a :class:`~.cluster.LocalEnv`: its CRDs, its Configuration, its manager process, queues.

What runs is the upstream controller manager (``sigs.k8s.io/kueue/cmd/kueue``, pinned in
``hack/tools/kueue/go.mod``) as a child process with the admin kubeconfig, on 127.0.0.1 only:
health probes and metrics on free ports, its webhook server on a free port with a certificate
from the local CA, no leader election, the ``batch/job`` integration alone, and only Jobs that
carry the ``kueue.x-k8s.io/queue-name`` label managed (``manageJobsWithoutQueueName: false``).

What does not run:

- Kueue's admission webhooks are served but not registered with the API server (no
  Validating/MutatingWebhookConfiguration): in a cluster the API server calls them through the
  ``kueue-webhook-service`` Service, and there is no Service network here. So nothing defaults
  or validates Kueue's objects or queued Jobs on create: a Job must be created suspended
  (Kueue's mutating webhook would have done it), and the queue objects are written complete.
- Internal certificate management (it would inject CA bundles into webhook configurations and
  CRD conversion settings that do not exist here). The CRDs come from the module source without
  their kustomize conversion-webhook patch, so only the storage version, ``v1beta2``, is
  usable; write every Kueue object as ``kueue.x-k8s.io/v1beta2``.
- The visibility API server (feature gate ``VisibilityOnDemand`` off): it would need an
  APIService and certificates at a fixed path.

Kueue v0.17, with internal certificate management off, reads its metrics serving certificate
from the fixed path ``/etc/kueue/metrics/certs``. The launcher puts one there for the Kueue
process alone: the manager runs in a private mount namespace (``unshare``) whose ``/etc`` is a
read-only overlay of the host's ``/etc`` and one extra folder; nothing on the host is written.
As root that is a plain mount namespace; otherwise a user namespace maps the user to root in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import pki as pki_mod
from . import tools
from .cluster import LOCALHOST, KubectlError, LaunchError, LocalEnv, ManagedProcess, pick_port

TOOL = "kueue"
API_VERSION = "kueue.x-k8s.io/v1beta2"
CONFIG_API_VERSION = "config.kueue.x-k8s.io/v1beta2"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_NAMESPACE = "kueue-system"
CRD_DIR = "config/components/crd/bases"  # inside the module source
METRICS_CERT_DIR = "kueue/metrics/certs"  # under /etc, where Kueue v0.17 reads it

DEFAULT_QUOTA: dict[str, str] = {"cpu": "8", "memory": "16Gi", "pods": "20", "nvidia.com/gpu": "0"}


# -- CRDs --------------------------------------------------------------------
def crd_files() -> list[Path]:
    """Kueue's CRD manifests, read from the pinned module in Go's module cache."""
    files = sorted((tools.module_dir(TOOL) / CRD_DIR).glob("*.yaml"))
    if not files:
        raise LaunchError(f"no Kueue CRDs under {tools.module_dir(TOOL) / CRD_DIR}")
    return files


def crd_names(files: Sequence[Path] | None = None) -> list[str]:
    """``kueue.x-k8s.io_workloads.yaml`` -> ``workloads.kueue.x-k8s.io``."""
    names = []
    for path in files if files is not None else crd_files():
        group, _, plural = path.stem.partition("_")
        names.append(f"{plural}.{group}")
    return names


def install_crds(env: LocalEnv, timeout: float = 60.0) -> list[str]:
    """Apply Kueue's CRDs (server-side: the Workload CRD is too big for the last-applied
    annotation) and wait until every one is Established; return their names."""
    files = crd_files()
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-localenv"]
    for path in files:
        args += ["-f", str(path)]
    env.kubectl(*args)
    names = crd_names(files)
    env.wait_established(*names, timeout=timeout)
    return names


def uninstall_crds(env: LocalEnv, timeout: float = 60.0) -> None:
    """Delete Kueue's CRDs (and with them every Kueue object) and wait until they are gone."""
    names = [f"crd/{n}" for n in crd_names()]
    env.kubectl("delete", "--ignore-not-found", "--wait=false", *names)
    env.kubectl("wait", "--for=delete", f"--timeout={timeout:.0f}s", *names, check=False)


# -- configuration -----------------------------------------------------------
@dataclass(frozen=True)
class KueuePorts:
    health: int
    metrics: int
    webhook: int


def configuration(ports: KueuePorts, webhook_cert_dir: Path) -> dict[str, Any]:
    """The manager's Configuration (``--config``); JSON is valid YAML."""
    return {
        "apiVersion": CONFIG_API_VERSION,
        "kind": "Configuration",
        "namespace": KUEUE_NAMESPACE,
        "manageJobsWithoutQueueName": False,
        "internalCertManagement": {"enable": False},
        "leaderElection": {"leaderElect": False},
        "health": {"healthProbeBindAddress": f"{LOCALHOST}:{ports.health}"},
        "metrics": {"bindAddress": f"{LOCALHOST}:{ports.metrics}"},
        "webhook": {"host": LOCALHOST, "port": ports.webhook, "certDir": str(webhook_cert_dir)},
        "integrations": {"frameworks": ["batch/job"]},
        "featureGates": {"VisibilityOnDemand": False},
    }


def kueue_dir(env: LocalEnv) -> Path:
    """Kueue's files in the env's state folder: config, certificates, the /etc overlay."""
    return env.state_dir / "kueue"


def _prepare_files(env: LocalEnv) -> tuple[Path, Path]:
    """Certificates for the webhook and metrics servers; return (webhook cert dir, /etc overlay)."""
    base = kueue_dir(env)
    certs = base / "webhook-certs"
    if not (certs / "tls.crt").exists():
        pki_mod.issue_serving_cert(env.pki, certs / "tls.crt", certs / "tls.key", "kueue-local")
    overlay = base / "etc-overlay"
    metrics = overlay / METRICS_CERT_DIR
    metrics.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        shutil.copyfile(certs / name, metrics / name)
        (metrics / name).chmod(0o600)
    return certs, overlay


def manager_argv(binary: Path, config: Path, kubeconfig: Path, etc_overlay: Path) -> list[str]:
    """The manager's command line, wrapped so that it sees ``etc_overlay`` layered over /etc."""
    if any(c in str(etc_overlay) for c in ":,"):
        raise LaunchError(f"{etc_overlay}: a path with ':' or ',' cannot be an overlay layer")
    unshare = shutil.which("unshare")
    if unshare is None:
        raise LaunchError("unshare (util-linux) not found: Kueue's metrics certificate is mounted with it")
    wrapper = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        wrapper.insert(1, "--map-root-user")
    # unshare and sh exec in place: the manager keeps this PID and PR_SET_PDEATHSIG.
    script = 'mount -t overlay kubetune-kueue-etc -o "lowerdir=$1:/etc" /etc && shift && exec "$@"'
    return [
        *wrapper,
        "--",
        "/bin/sh",
        "-c",
        script,
        "sh",
        str(etc_overlay),
        str(binary),
        f"--config={config}",
        f"--kubeconfig={kubeconfig}",
        "--zap-log-level=info",
    ]


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


# -- the manager -------------------------------------------------------------
def start_kueue(env: LocalEnv, *, timeout: float = 120.0) -> ManagedProcess:
    """Install Kueue's CRDs, write its Configuration, start the manager and wait until its
    ``/healthz`` and ``/readyz`` answer; return the process (``proc.stop()`` stops it: SIGTERM,
    then SIGKILL after a grace period). It dies with its parent like every other component.

    Fits ``LocalEnv.extra_start``: ``env.extra_start.append(start_kueue)``.
    """
    binary = tools.build(TOOL)
    install_crds(env, timeout=min(timeout, 60.0))
    certs, overlay = _prepare_files(env)
    used: set[int] = set()
    for _attempt in range(5):
        ports = _distinct_ports(used)
        config = kueue_dir(env) / "config.yaml"
        config.write_text(json.dumps(configuration(ports, certs), indent=2))
        argv = manager_argv(binary, config, env.kubeconfig, overlay)
        proc = ManagedProcess("kueue", argv, env.logs_dir / "kueue.log")
        proc.start()
        try:
            _wait_ready(proc, ports, timeout)
        except LaunchError:
            proc.stop()
            tail = proc.log_tail(60).lower()
            if "address already in use" in tail:
                used.update((ports.health, ports.metrics, ports.webhook))
                continue
            raise
        return proc
    raise LaunchError("kueue: no free ports found after 5 attempts")


def _distinct_ports(used: set[int]) -> KueuePorts:
    taken = set(used)
    picked = []
    for _ in range(3):
        port = pick_port(None, taken)
        taken.add(port)
        picked.append(port)
    return KueuePorts(*picked)


def _wait_ready(proc: ManagedProcess, ports: KueuePorts, timeout: float) -> None:
    base = f"http://{LOCALHOST}:{ports.health}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LaunchError(f"kueue exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
        with contextlib.suppress(OSError):
            if _http_ok(f"{base}/healthz") and _http_ok(f"{base}/readyz"):
                return
        time.sleep(0.2)
    raise LaunchError(f"kueue not ready after {timeout:.0f}s; log {proc.log_path}:\n{proc.log_tail()}")


@contextlib.contextmanager
def running_kueue(
    env: LocalEnv, *, timeout: float = 120.0, uninstall: bool = True
) -> Iterator[ManagedProcess]:
    """``with running_kueue(env) as proc:`` -- Kueue runs inside the block and is stopped after it.

    With ``uninstall`` (the default) its CRDs are deleted first, while the manager
    still runs to drop its finalizers, so code that asks "is Kueue installed?" (the operator gets
    a 404 for Workloads) sees the cluster as it was before.
    """
    proc = start_kueue(env, timeout=timeout)
    try:
        yield proc
    finally:
        try:
            if uninstall:
                uninstall_crds(env)
        finally:
            proc.stop()


# -- queues ------------------------------------------------------------------
@dataclass(frozen=True)
class Queues:
    """One ResourceFlavor, a ClusterQueue using it, and a LocalQueue pointing at that."""

    namespace: str
    local_queue: str
    cluster_queue: str
    flavor: str


def queue_manifests(queues: Queues, quota: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The three objects, complete (no defaulting webhook fills them in here)."""
    quota = DEFAULT_QUOTA if quota is None else quota
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "ResourceFlavor",
            "metadata": {"name": queues.flavor},
            "spec": {},
        },
        {
            "apiVersion": API_VERSION,
            "kind": "ClusterQueue",
            "metadata": {"name": queues.cluster_queue},
            "spec": {
                "namespaceSelector": {},  # every namespace
                "queueingStrategy": "BestEffortFIFO",
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": queues.flavor,
                                "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": API_VERSION,
            "kind": "LocalQueue",
            "metadata": {"name": queues.local_queue, "namespace": queues.namespace},
            "spec": {"clusterQueue": queues.cluster_queue},
        },
    ]


def get_object(env: LocalEnv, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """One Kueue object (``kind`` as kubectl names it, e.g. ``workloads.kueue.x-k8s.io``), or None."""
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = env.kubectl(*args)
    return json.loads(out) if out.strip() else None


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    """The status condition of ``type_`` on ``obj``, if any."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def create_queues(
    env: LocalEnv,
    namespace: str,
    *,
    local_queue: str = "kubetune",
    cluster_queue: str | None = None,
    flavor: str = "default",
    quota: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Queues:
    """Create a ResourceFlavor ``flavor``, a ClusterQueue (default name ``cq-<namespace>``) with
    nominal ``quota`` for every namespace, and a LocalQueue ``local_queue`` in ``namespace``;
    wait until both queues are Active. Label a Job ``kueue.x-k8s.io/queue-name=<local_queue>``."""
    queues = Queues(namespace, local_queue, cluster_queue or f"cq-{namespace}", flavor)
    manifest = {"apiVersion": "v1", "kind": "List", "items": queue_manifests(queues, quota)}
    env.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    deadline = time.monotonic() + timeout
    for kind, name, ns in (
        ("clusterqueues.kueue.x-k8s.io", queues.cluster_queue, None),
        ("localqueues.kueue.x-k8s.io", queues.local_queue, namespace),
    ):
        while True:
            active = condition(get_object(env, kind, name, ns), "Active")
            if active and active.get("status") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind} {name} not Active after {timeout:.0f}s (condition: {active})")
            time.sleep(0.25)
    return queues


def delete_queues(env: LocalEnv, queues: Queues, timeout: float = 60.0) -> None:
    """Delete the LocalQueue, ClusterQueue and ResourceFlavor and wait until they are gone (Kueue
    must still be running: it holds finalizers on them while workloads use them)."""
    objects = [
        ("localqueues.kueue.x-k8s.io", queues.local_queue, queues.namespace),
        ("clusterqueues.kueue.x-k8s.io", queues.cluster_queue, None),
        ("resourceflavors.kueue.x-k8s.io", queues.flavor, None),
    ]
    for kind, name, ns in objects:
        args = ["delete", kind, name, "--ignore-not-found", f"--timeout={timeout:.0f}s"]
        if ns:
            args += ["-n", ns]
        try:
            env.kubectl(*args)
        except KubectlError as err:
            raise TimeoutError(f"deleting {kind} {name}: {err}") from err
