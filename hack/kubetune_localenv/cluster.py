"""The local control plane: etcd, kube-apiserver, kube-controller-manager and an S3 server.

Everything binds to 127.0.0.1 on free ports, like controller-runtime's envtest.
Every child process gets ``PR_SET_PDEATHSIG`` so that it dies with the process
that started it: a killed test session or launcher leaves nothing behind.

Used three ways: by pytest fixtures (in-process, :class:`LocalEnv`), by
``make cluster-up``/``cluster-down`` (a detached supervisor, see ``__main__``),
and by the demo.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import pki as pki_mod
from . import tools

LOCALHOST = "127.0.0.1"
SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A component failed to start; the message names it and shows its log's tail."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError, the message includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL us when
    # the parent dies, so no etcd/apiserver outlives a killed launcher. libc is
    # loaded before the fork: only the prctl call itself runs in the child.
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int | None = None, avoid: set[int] | None = None) -> int:
    """``preferred`` if it is free, otherwise any free port on 127.0.0.1."""
    avoid = avoid or set()
    if preferred and preferred not in avoid and port_is_free(preferred):
        return preferred
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port


def _env_port(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


@dataclass
class ManagedProcess:
    """A child process with its own log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again: same argv, so the same ports) the process.

        Call it from a thread that lives as long as the process should: ``PR_SET_PDEATHSIG``
        fires when the *thread* that forked the child exits, so a component started again from a
        short-lived helper thread is SIGKILLed when that thread ends.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (only a prctl call runs)
        )
        log.close()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if not self.popen or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _wait_until(what: str, check: Callable[[], bool], proc: ManagedProcess | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise LaunchError(f"{what} exited during start-up; log {proc.log_path}:\n{proc.log_tail()}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    tail = f"; log {proc.log_path}:\n{proc.log_tail()}" if proc else ""
    raise LaunchError(f"{what} not ready after {timeout:.0f}s{tail}")


def _address_in_use(proc: ManagedProcess) -> bool:
    tail = proc.log_tail(60).lower()
    return "address already in use" in tail or "bind: address" in tail


@dataclass
class S3Settings:
    """How to reach the local S3 server; the values go to ``s3.env``."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


@dataclass
class LocalEnv:
    """A running (or startable) local control plane plus S3 server.

    ``state_dir`` holds certificates, data, logs, ``kubeconfig`` and ``s3.env``.
    """

    state_dir: Path
    with_controller_manager: bool = True
    with_s3: bool = True
    processes: list[ManagedProcess] = field(default_factory=list)
    apiserver_port: int = 0
    s3: S3Settings | None = None
    extra_start: list[Callable[[LocalEnv], ManagedProcess]] = field(default_factory=list)
    #: Extra kube-apiserver flags (the scale benchmark's audit log).
    apiserver_args: list[str] = field(default_factory=list)
    #: Extra kube-controller-manager flags (the scale benchmark's client rate limits).
    controller_manager_args: list[str] = field(default_factory=list)

    # -- paths -----------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def s3_env_file(self) -> Path:
        return self.state_dir / "s3.env"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki(self) -> pki_mod.Pki:
        return pki_mod.Pki(self.state_dir / "pki")

    @property
    def apiserver_url(self) -> str:
        return f"https://{LOCALHOST}:{self.apiserver_port}"

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Build (if needed) and start every component; return once all are ready."""
        names = ["etcd", "kube-apiserver", "kubectl"]
        if self.with_controller_manager:
            names.append("kube-controller-manager")
        if self.with_s3:
            names.append("versitygw")
        binaries = tools.build_all(names)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        try:
            pki_mod.create(self.pki.dir)
            etcd_url = self._start_etcd(binaries["etcd"], timeout)
            self._start_apiserver(binaries["kube-apiserver"], etcd_url, timeout)
            self._write_kubeconfig()
            if self.with_controller_manager:
                self._start_controller_manager(binaries["kube-controller-manager"], timeout)
            if self.with_s3:
                self._start_s3(binaries["versitygw"], timeout)
            for starter in self.extra_start:
                self.processes.append(starter(self))
            self._write_state()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every component, newest first; idempotent."""
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def __enter__(self) -> LocalEnv:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- components ------------------------------------------------------------
    def _launch(
        self,
        name: str,
        make_argv: Callable[[set[int]], tuple[list[str], list[int]]],
        ready: Callable[[list[int]], bool],
        timeout: float,
        env: dict[str, str] | None = None,
    ) -> list[int]:
        """Start ``name`` on fresh ports, retrying with other ports if one is taken."""
        used: set[int] = set()
        for _attempt in range(5):
            argv, ports = make_argv(used)
            proc = ManagedProcess(name, argv, self.logs_dir / f"{name}.log", env)
            proc.start()
            try:
                _wait_until(name, lambda ports=ports: ready(ports), proc, timeout)  # type: ignore[misc]
            except LaunchError:
                if _address_in_use(proc):
                    proc.stop()
                    used.update(ports)
                    continue
                proc.stop()
                raise
            self.processes.append(proc)
            return ports
        raise LaunchError(f"{name}: no free port found after 5 attempts")

    def _start_etcd(self, binary: Path, timeout: float) -> str:
        data_dir = self.state_dir / "etcd"

        def argv(used: set[int]) -> tuple[list[str], list[int]]:
            client = pick_port(_env_port("KUBETUNE_ETCD_PORT"), used)
            peer = pick_port(None, used | {client})
            return (
                [
                    str(binary),
                    f"--data-dir={data_dir}",
                    f"--listen-client-urls=http://{LOCALHOST}:{client}",
                    f"--advertise-client-urls=http://{LOCALHOST}:{client}",
                    f"--listen-peer-urls=http://{LOCALHOST}:{peer}",
                    f"--initial-advertise-peer-urls=http://{LOCALHOST}:{peer}",
                    f"--initial-cluster=default=http://{LOCALHOST}:{peer}",
                    "--unsafe-no-fsync=true",  # throwaway data: speed over durability
                    "--quota-backend-bytes=4294967296",
                    "--log-level=warn",
                ],
                [client, peer],
            )

        def ready(ports: list[int]) -> bool:
            with urllib.request.urlopen(f"http://{LOCALHOST}:{ports[0]}/health", timeout=2) as resp:
                return bool(json.load(resp).get("health") == "true")

        ports = self._launch("etcd", argv, ready, timeout)
        return f"http://{LOCALHOST}:{ports[0]}"

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def api_get(self, path: str, timeout: float = 5.0) -> bytes:
        """GET ``path`` from the apiserver as the admin (used for readiness checks)."""
        req = urllib.request.Request(self.apiserver_url + path)
        with urllib.request.urlopen(req, timeout=timeout, context=self._tls_context()) as resp:
            return bytes(resp.read())

    def _start_apiserver(self, binary: Path, etcd_url: str, timeout: float) -> None:
        p = self.pki

        def argv(used: set[int]) -> tuple[list[str], list[int]]:
            port = pick_port(_env_port("KUBETUNE_APISERVER_PORT"), used)
            return (
                [
                    str(binary),
                    f"--etcd-servers={etcd_url}",
                    f"--bind-address={LOCALHOST}",
                    f"--advertise-address={LOCALHOST}",
                    f"--secure-port={port}",
                    f"--tls-cert-file={p.serving_crt}",
                    f"--tls-private-key-file={p.serving_key}",
                    f"--client-ca-file={p.ca_crt}",
                    f"--service-account-issuer={SA_ISSUER}",
                    f"--service-account-key-file={p.sa_pub}",
                    f"--service-account-signing-key-file={p.sa_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=RBAC",
                    "--allow-privileged=true",
                    # No real nodes or service network: nothing to reconcile endpoints to.
                    "--endpoint-reconciler-type=none",
                    "--enable-priority-and-fairness=false",
                    "--profiling=false",
                    "--v=1",
                    *self.apiserver_args,
                ],
                [port],
            )

        def ready(ports: list[int]) -> bool:
            self.apiserver_port = ports[0]
            return self.api_get("/readyz") == b"ok"

        self.apiserver_port = self._launch("kube-apiserver", argv, ready, timeout)[0]

    def _write_kubeconfig(self) -> None:
        p = self.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-local",
                    "cluster": {"server": self.apiserver_url, "certificate-authority": str(p.ca_crt)},
                }
            ],
            "users": [
                {
                    "name": "kubetune-admin",
                    "user": {"client-certificate": str(p.admin_crt), "client-key": str(p.admin_key)},
                }
            ],
            "contexts": [
                {"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": "kubetune-admin"}}
            ],
            "current-context": "kubetune-local",
        }
        # JSON is valid YAML; kubectl and the Python client read it as is.
        self.kubeconfig.write_text(json.dumps(config, indent=2))
        self.kubeconfig.chmod(0o600)

    def _start_controller_manager(self, binary: Path, timeout: float) -> None:
        p = self.pki

        def argv(used: set[int]) -> tuple[list[str], list[int]]:
            port = pick_port(None, used)
            return (
                [
                    str(binary),
                    f"--kubeconfig={self.kubeconfig}",
                    f"--authentication-kubeconfig={self.kubeconfig}",
                    f"--authorization-kubeconfig={self.kubeconfig}",
                    f"--bind-address={LOCALHOST}",
                    f"--secure-port={port}",
                    f"--root-ca-file={p.ca_crt}",
                    f"--service-account-private-key-file={p.sa_key}",
                    f"--cluster-signing-cert-file={p.ca_crt}",
                    f"--cluster-signing-key-file={p.ca_key}",
                    "--leader-elect=false",
                    "--use-service-account-credentials=false",
                    # Controllers that need a cloud or a pod network are of no use here.
                    "--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle",
                    "--concurrent-gc-syncs=5",
                    "--v=1",
                    *self.controller_manager_args,
                ],
                [port],
            )

        def ready(ports: list[int]) -> bool:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # kcm serves a self-signed cert on loopback
            url = f"https://{LOCALHOST}:{ports[0]}/healthz"
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return bool(resp.read() == b"ok")

        self._launch("kube-controller-manager", argv, ready, timeout)
        # Pods need their namespace's "default" ServiceAccount, which kcm creates.
        _wait_until(
            "ServiceAccount default/default",
            lambda: bool(self.api_get("/api/v1/namespaces/default/serviceaccounts/default")),
            None,
            timeout,
        )

    def _start_s3(self, binary: Path, timeout: float) -> None:
        root = self.state_dir / "s3data"
        root.mkdir(exist_ok=True)
        # Object metadata (ETags, content types) in a sidecar folder: works on any
        # filesystem, unlike the default xattrs.
        sidecar = self.state_dir / "s3meta-sidecar"
        sidecar.mkdir(exist_ok=True)
        access = "kubetune" + secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)

        def argv(used: set[int]) -> tuple[list[str], list[int]]:
            port = pick_port(_env_port("KUBETUNE_S3_PORT"), used)
            return (
                [
                    str(binary),
                    "--port",
                    f"{LOCALHOST}:{port}",
                    "posix",
                    "--sidecar",
                    str(sidecar),
                    str(root),
                ],
                [port],
            )

        def ready(ports: list[int]) -> bool:
            with socket.create_connection((LOCALHOST, ports[0]), timeout=1):
                return True

        # The keys go through the environment, not argv: argv is world-readable in /proc.
        keys = dict(os.environ, ROOT_ACCESS_KEY_ID=access, ROOT_SECRET_ACCESS_KEY=secret)
        port = self._launch("versitygw", argv, ready, timeout, env=keys)[0]
        self.s3 = S3Settings(f"http://{LOCALHOST}:{port}", access, secret)
        lines = [f"{k}={v}" for k, v in self.s3.env().items()]
        self.s3_env_file.write_text("\n".join(lines) + "\n")
        self.s3_env_file.chmod(0o600)

    def _write_state(self) -> None:
        state = {
            "apiserver": self.apiserver_url,
            "kubeconfig": str(self.kubeconfig),
            "s3": self.s3.endpoint if self.s3 else None,
            "pids": {p.name: p.pid for p in self.processes},
        }
        (self.state_dir / "state.json").write_text(json.dumps(state, indent=2))

    # -- helpers ---------------------------------------------------------------
    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> str:
        """Run the pinned kubectl against this cluster; return stdout."""
        proc = subprocess.run(
            [str(tools.tool_path("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc.stdout

    def wait_established(self, *crds: str, timeout: float = 60.0) -> None:
        """Wait until every named CRD is Established.

        Polled, not ``kubectl wait --for=condition=Established``: on a CRD whose status has no
        conditions yet, that can fail at once ("status.conditions accessor error: <nil> is of the
        type <nil>") instead of waiting, a flake right after the CRD is applied.
        """
        deadline = time.monotonic() + timeout
        established = '{.status.conditions[?(@.type=="Established")].status}'
        for crd in crds:
            while self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={established}", check=False) != "True":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {crd} is not Established after {timeout:.0f} s")
                time.sleep(0.2)

    def env(self) -> dict[str, str]:
        """Environment variables a client process needs (KUBECONFIG and AWS_*)."""
        env = {"KUBECONFIG": str(self.kubeconfig)}
        if self.s3:
            env.update(self.s3.env())
        return env


def log(message: str) -> None:
    print(f"kubetune: {message}", file=sys.stderr, flush=True)
