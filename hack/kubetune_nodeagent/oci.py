"""The OCI runtime config (``config.json``) of one container in the agent's OCI mode (pure).

From the pod's and the container's ``securityContext`` and the image's config, as the kubelet and
containerd would: the user (``runAsUser``/``runAsGroup``, else the image's USER; ``fsGroup`` and
``supplementalGroups`` as additional groups), the ``runAsNonRoot`` check (refused before start
with the kubelet's message: CreateContainerConfigError), capabilities (containerd's default set,
``drop``/``add``), ``allowPrivilegeEscalation: false`` as ``noNewPrivileges``, seccomp
``RuntimeDefault`` (the containers-common profile, filtered by capability and architecture like
Docker/containerd do), ``readOnlyRootFilesystem`` as a read-only root, the masked and read-only
``/proc`` paths, and the pod's volumes as bind mounts. Namespaces: mount, UTS and IPC of its own;
the network is the host's (pods reach the API server and S3 on 127.0.0.1); the PID namespace is
the exec helper's new one (the runtime is its PID 1: when it ends, everything in it is killed).
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .imagestore import StoredImage
from .podspec import NotReadyError

JSON = dict[str, Any]
#: containerd's (and Docker's) default capabilities of a container.
DEFAULT_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP",
    "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip
ALL_CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
]  # fmt: skip
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
#: The RuntimeDefault profile on this host (containers-common, what podman and CRI-O use).
DEFAULT_SECCOMP = Path("/usr/share/containers/seccomp.json")
#: uname -m → (the profile's archMap name, the Go name its includes/excludes "arches" use).
_ARCHES = {"x86_64": ("SCMP_ARCH_X86_64", "amd64"), "aarch64": ("SCMP_ARCH_AARCH64", "arm64")}


@dataclass(frozen=True)
class Identity:
    """Who the container's process runs as."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"


def security_context(pod_spec: JSON, container: JSON) -> JSON:
    """The container's effective securityContext: its own fields over the pod's."""
    pod = dict(pod_spec.get("securityContext") or {})
    own = dict(container.get("securityContext") or {})
    merged = {k: pod[k] for k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile") if k in pod}
    merged.update(own)
    return merged


def _passwd(image: StoredImage, path: str) -> list[list[str]]:
    found = image.find_file(path)
    try:
        text = found.read_text() if found is not None and found.is_file() else ""
    except OSError:
        text = ""
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _user_of(image: StoredImage, user: str) -> tuple[int, int | None, str]:
    """uid, gid (None: the passwd entry's) and home of the image's USER ``name|uid[:group|gid]``."""
    name, _, group = user.partition(":")
    entries = _passwd(image, "/etc/passwd")
    entry = next((e for e in entries if len(e) > 5 and name in (e[0], e[2])), None)
    if name.isdigit():
        uid = int(name)
    elif entry is not None:
        uid = int(entry[2])
    else:
        raise NotReadyError(
            "CreateContainerError", f"unable to find user {name}: no matching entries in passwd"
        )
    gid: int | None = int(entry[3]) if entry is not None else None
    if group.isdigit():
        gid = int(group)
    elif group:
        match = next((g for g in _passwd(image, "/etc/group") if len(g) > 2 and g[0] == group), None)
        if match is None:
            raise NotReadyError("CreateContainerError", f"unable to find group {group}")
        gid = int(match[2])
    return uid, gid, entry[5] if entry is not None else "/"


def identity(pod: JSON, container: JSON, image: StoredImage) -> Identity:
    """The container's user, checked against ``runAsNonRoot`` as the kubelet does."""
    ctx = security_context(pod["spec"], container)
    where = (
        f'(pod: "{pod["metadata"]["name"]}_{pod["metadata"]["namespace"]}", container: {container["name"]})'
    )
    run_as = ctx.get("runAsUser")
    if ctx.get("runAsNonRoot"):
        image_user = image.user.partition(":")[0] or "0"
        if run_as is not None and int(run_as) == 0:
            raise NotReadyError(
                "CreateContainerConfigError", f"container's runAsUser breaks non-root policy {where}"
            )
        if run_as is None and not image_user.isdigit():
            message = (
                f"container has runAsNonRoot and image has non-numeric user ({image_user}), "
                f"cannot verify user is non-root {where}"
            )
            raise NotReadyError("CreateContainerConfigError", message)
        if run_as is None and int(image_user) == 0:
            raise NotReadyError(
                "CreateContainerConfigError", f"container has runAsNonRoot and image will run as root {where}"
            )
    uid, gid, home = _user_of(image, image.user or "0")
    if run_as is not None:
        uid = int(run_as)
        entry = next((e for e in _passwd(image, "/etc/passwd") if len(e) > 5 and e[2] == str(uid)), None)
        gid, home = (int(entry[3]), entry[5]) if entry is not None else (None, "/")
    if ctx.get("runAsGroup") is not None:
        gid = int(ctx["runAsGroup"])
    pod_ctx = pod["spec"].get("securityContext") or {}
    groups = [int(g) for g in pod_ctx.get("supplementalGroups") or []]
    if pod_ctx.get("fsGroup") is not None:
        groups.insert(0, int(pod_ctx["fsGroup"]))
    return Identity(
        uid=uid, gid=gid if gid is not None else 0, groups=tuple(dict.fromkeys(groups)), home=home
    )


def capabilities(ctx: JSON) -> list[str]:
    """containerd's default set, minus ``drop``, plus ``add`` (``ALL`` allowed in both)."""
    if ctx.get("privileged"):
        return [f"CAP_{c}" for c in ALL_CAPABILITIES]
    caps = ctx.get("capabilities") or {}
    drop = {str(c).upper().removeprefix("CAP_") for c in caps.get("drop") or []}
    add = {str(c).upper().removeprefix("CAP_") for c in caps.get("add") or []}
    kept = [] if "ALL" in drop else [c for c in DEFAULT_CAPABILITIES if c not in drop]
    kept += ALL_CAPABILITIES if "ALL" in add else sorted(add - set(kept))
    return [f"CAP_{c}" for c in dict.fromkeys(kept)]


def _rule_applies(rule: JSON, caps: set[str], arch: str) -> bool:
    includes, excludes = rule.get("includes") or {}, rule.get("excludes") or {}
    if includes.get("caps") and not set(includes["caps"]) <= caps:
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if excludes.get("caps") and set(excludes["caps"]) & caps:
        return False
    return not (excludes.get("arches") and arch in excludes["arches"])


def seccomp_profile(profile: JSON, caps: list[str], machine: str | None = None) -> JSON:
    """A Docker-format profile (containers-common's seccomp.json) as the OCI ``linux.seccomp``."""
    scmp_arch, arch = _ARCHES.get(machine or platform.machine(), ("", ""))
    held = set(caps)
    arches: list[str] = []
    for entry in profile.get("archMap") or []:
        if entry["architecture"] == scmp_arch:
            arches = [entry["architecture"], *entry.get("subArchitectures", [])]
    syscalls = []
    for rule in profile.get("syscalls") or []:
        if not _rule_applies(rule, held, arch):
            continue
        out: JSON = {"names": rule["names"], "action": rule["action"]}
        if rule.get("args"):
            out["args"] = rule["args"]
        if rule.get("errnoRet") is not None:
            out["errnoRet"] = rule["errnoRet"]
        syscalls.append(out)
    result: JSON = {"defaultAction": profile["defaultAction"], "architectures": arches, "syscalls": syscalls}
    if profile.get("defaultErrnoRet") is not None:
        result["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return result


def seccomp_for(ctx: JSON, caps: list[str], localhost_root: Path) -> JSON | None:
    """``linux.seccomp`` for the effective seccompProfile (unset or Unconfined: none)."""
    profile = ctx.get("seccompProfile") or {}
    kind = profile.get("type")
    if ctx.get("privileged") or kind in (None, "Unconfined"):
        return None
    if kind == "RuntimeDefault":
        return seccomp_profile(json.loads(DEFAULT_SECCOMP.read_text()), caps)
    if kind == "Localhost":
        path = localhost_root / str(profile.get("localhostProfile") or "")
        try:
            return seccomp_profile(json.loads(path.read_text()), caps)
        except (OSError, ValueError) as exc:
            raise NotReadyError("CreateContainerError", f"cannot load seccomp profile {path}: {exc}") from exc
    raise NotReadyError("CreateContainerConfigError", f"unsupported seccompProfile type {kind!r}")


def _system_mounts(volume_targets: set[str]) -> list[JSON]:
    mounts: list[JSON] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
    ]
    if "/dev/shm" not in volume_targets:  # the sandbox's 64 MiB /dev/shm, as with containerd
        shm_options = ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": shm_options})
    return mounts


@dataclass(frozen=True)
class Process:
    """What runs: argv, environment, working directory, hostname."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    hostname: str


def runtime_config(
    pod: JSON, container: JSON, who: Identity, process: Process, *, mounts: list[JSON], seccomp_root: Path
) -> JSON:
    """The OCI runtime config of the container (root path ``rootfs`` inside the bundle)."""
    ctx = security_context(pod["spec"], container)
    caps = capabilities(ctx)
    binds = [
        {
            "destination": m["target"],
            "type": "bind",
            "source": m["source"],
            "options": ["rbind", "rprivate", *(["ro"] if m.get("readOnly") else [])],
        }
        for m in mounts
    ]
    linux: JSON = {
        "namespaces": [{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
        "maskedPaths": [] if ctx.get("privileged") else MASKED_PATHS,
        "readonlyPaths": [] if ctx.get("privileged") else READONLY_PATHS,
    }
    seccomp = seccomp_for(ctx, caps, seccomp_root)
    if seccomp is not None:
        linux["seccomp"] = seccomp
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": who.uid, "gid": who.gid, "additionalGids": list(who.groups)},
            "args": process.argv,
            "env": [f"{k}={v}" for k, v in process.env.items()],
            "cwd": process.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": ctx.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": "rootfs", "readonly": bool(ctx.get("readOnlyRootFilesystem"))},
        "hostname": process.hostname,
        "mounts": [*_system_mounts({m["target"] for m in mounts}), *binds],
        "linux": linux,
    }
