"""Build the local control plane's binaries from the Go module proxy.

Each tool has a throwaway Go module under ``hack/tools/<name>/`` whose ``go.mod``
and ``go.sum`` pin the exact version (the single source of truth for versions).
Binaries land in a cache outside the repository, keyed by a hash of those files
and the Go version, so a warm run builds nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HACK_DIR = Path(__file__).resolve().parent.parent
TOOLS_DIR = HACK_DIR / "tools"


class ToolBuildError(RuntimeError):
    """A Go tool could not be built; the message names the module and version."""


@dataclasses.dataclass(frozen=True)
class GoTool:
    """One binary built from a pinned Go module."""

    name: str  # binary name
    tool_dir: str  # folder under hack/tools holding go.mod/go.sum
    package: str  # Go package path of the main package
    module: str  # module whose version is pinned (for messages and ldflags)
    version_ldflags: tuple[str, ...] = ()  # -X flags; "{version}" is substituted


_K8S_VERSION_FLAGS = (
    "-X k8s.io/component-base/version.gitVersion={version}",
    "-X k8s.io/component-base/version.gitMajor={major}",
    "-X k8s.io/component-base/version.gitMinor={minor}",
    "-X k8s.io/component-base/version.gitTreeState=clean",
    "-X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z",
    "-X k8s.io/client-go/pkg/version.gitVersion={version}",
    "-X k8s.io/client-go/pkg/version.gitMajor={major}",
    "-X k8s.io/client-go/pkg/version.gitMinor={minor}",
)

TOOLS: dict[str, GoTool] = {
    tool.name: tool
    for tool in (
        GoTool("etcd", "etcd", "go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/server/v3"),
        GoTool(
            "kube-apiserver",
            "kubernetes",
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes",
            _K8S_VERSION_FLAGS,
        ),
        GoTool(
            "kube-controller-manager",
            "kubernetes",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes",
            _K8S_VERSION_FLAGS,
        ),
        GoTool(
            "kube-scheduler",
            "kubernetes",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes",
            _K8S_VERSION_FLAGS,
        ),
        GoTool(
            "kubectl",
            "kubernetes",
            "k8s.io/kubernetes/cmd/kubectl",
            "k8s.io/kubernetes",
            _K8S_VERSION_FLAGS,
        ),
        GoTool(
            "helm",
            "helm",
            "helm.sh/helm/v4/cmd/helm",
            "helm.sh/helm/v4",
            ("-X helm.sh/helm/v4/internal/version.version={version}",),
        ),
        GoTool("kwok", "kwok", "sigs.k8s.io/kwok/cmd/kwok", "sigs.k8s.io/kwok"),
        GoTool(
            "kube-score",
            "kube-score",
            "github.com/zegl/kube-score/cmd/kube-score",
            "github.com/zegl/kube-score",
            ("-X main.version={version}",),
        ),
        GoTool(
            "kueue",
            "kueue",
            "sigs.k8s.io/kueue/cmd/kueue",
            "sigs.k8s.io/kueue",
            ("-X sigs.k8s.io/kueue/pkg/version.GitVersion={version}",),
        ),
        GoTool(
            "actionlint",
            "actionlint",
            "github.com/rhysd/actionlint/cmd/actionlint",
            "github.com/rhysd/actionlint",
            ("-X github.com/rhysd/actionlint.version={version}",),
        ),
        GoTool(
            "versitygw",
            "versitygw",
            "github.com/versity/versitygw/cmd/versitygw",
            "github.com/versity/versitygw",
        ),
    )
}


def cache_root() -> Path:
    """Where built binaries live: ``$KUBETUNE_CACHE`` or ``~/.cache/kubetune``."""
    env = os.environ.get("KUBETUNE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune"


def pinned_version(tool: GoTool) -> str:
    """The version ``go.mod`` requires for the tool's module."""
    text = (TOOLS_DIR / tool.tool_dir / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(tool.module)}\s+(v\S+)", text, re.M)
    if not match:
        raise ToolBuildError(f"hack/tools/{tool.tool_dir}/go.mod does not require {tool.module}")
    return match.group(1)


@functools.cache  # one `go env` per process: tool_path() runs for every kubectl call
def _go_version(go: str) -> str:
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _find_go() -> str:
    override = os.environ.get("KUBETUNE_GO")
    if override:
        go: str | None = override if Path(override).is_file() else None
    else:
        fallback = "/usr/local/go/bin/go"
        go = shutil.which("go") or (fallback if Path(fallback).exists() else None)
    if go is None:
        raise ToolBuildError(
            "Go toolchain not found: install Go >= 1.26 (https://go.dev/doc/install) and put `go` on PATH"
        )
    return go


def tool_path(name: str) -> Path:
    """Path of the cached binary for ``name`` (it may not be built yet)."""
    tool = TOOLS[name]
    key = f"{pinned_version(tool)}-{_pin_digest(str(TOOLS_DIR / tool.tool_dir), _find_go())}"
    return cache_root() / "bin" / f"{tool.name}-{key}" / tool.name


@functools.cache  # hashing the Kubernetes go.sum once per process, not per kubectl call
def _pin_digest(mod_dir: str, go: str) -> str:
    digest = hashlib.sha256()
    for part in ("go.mod", "go.sum"):
        digest.update((Path(mod_dir) / part).read_bytes())
    digest.update(_go_version(go).encode())
    return digest.hexdigest()[:12]


def _ldflags(tool: GoTool) -> str:
    version = pinned_version(tool)
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"] + [f.format(version=version, major=major, minor=minor) for f in tool.version_ldflags]
    return " ".join(flags)


def build(name: str, *, quiet: bool = False) -> Path:
    """Build ``name`` into the cache unless it is already there; return its path."""
    tool = TOOLS[name]
    target = tool_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build per tool at a time across processes (pytest workers, make, helpers).
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        return _build_locked(tool, target, quiet)


def _build_locked(tool: GoTool, target: Path, quiet: bool) -> Path:
    go = _find_go()
    version = pinned_version(tool)
    tmp = target.with_name(f".{tool.name}.tmp{os.getpid()}")
    env = dict(os.environ, CGO_ENABLED="0", GOTOOLCHAIN="local", GOFLAGS="-mod=mod -trimpath")
    cmd = [go, "build", "-o", str(tmp), "-ldflags", _ldflags(tool), tool.package]
    if not quiet:
        print(f"kubetune: building {tool.name} ({tool.module} {version}) ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=TOOLS_DIR / tool.tool_dir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        hint = ""
        if any(
            sign in proc.stderr for sign in ("dial tcp", "no such host", "connection refused", "i/o timeout")
        ):
            hint = "\n(the Go module proxy could not be reached: check GOPROXY and network access)"
        raise ToolBuildError(f"building {tool.name} from {tool.module}@{version} failed:\n{tail}{hint}")
    tmp.rename(target)
    if not quiet:
        took = time.monotonic() - started
        print(f"kubetune: built {tool.name} in {took:.0f}s -> {target}", file=sys.stderr, flush=True)
    return target


def module_dir(name: str) -> Path:
    """The source folder of ``name``'s pinned module in Go's module cache (downloaded if missing).

    For files a tool ships beside its binary (Kueue's CRDs): read at the pinned version, not copied
    into the repository.
    """
    tool = TOOLS[name]
    version = pinned_version(tool)
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="-mod=mod")
    proc = subprocess.run(
        [_find_go(), "mod", "download", "-json", f"{tool.module}@{version}"],
        cwd=TOOLS_DIR / tool.tool_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        info = {}
    if proc.returncode != 0 or not info.get("Dir"):
        detail = info.get("Error") or proc.stderr.strip()
        raise ToolBuildError(f"downloading {tool.module}@{version} failed: {detail}")
    return Path(info["Dir"])


def build_all(names: list[str] | None = None) -> dict[str, Path]:
    """Build every tool (or ``names``); return name -> binary path."""
    return {name: build(name) for name in (names or list(TOOLS))}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        paths = build_all(args or None)
    except ToolBuildError as err:
        print(f"kubetune: error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
