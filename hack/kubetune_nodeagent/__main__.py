"""``python -m kubetune_nodeagent``: run the node agent (see the package docstring and docs/nodeagent.md).

    python -m kubetune_nodeagent --kubeconfig .kubetune/kubeconfig \\
        --node-name kubetune-local --state-dir .kubetune/nodes/kubetune-local --gpus 1
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune_operator.kube import Kube

from . import images
from .agent import Agent, AgentSettings
from .containers import EXEC_HELPER
from .node import DEFAULT_NODE_NAME, EXTENDED_GPU, NodeShape

JSON = dict[str, object]
log = logging.getLogger("nodeagent")


def host_memory_bytes() -> int:
    """Physical memory, or the memory cgroup's limit if that is smaller."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def check_namespaces() -> None:
    """Exit with a clear message if containers cannot get their own mount/PID namespaces."""
    probe = subprocess.run(
        [sys.executable, str(EXEC_HELPER), "--probe"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        sys.exit(
            "nodeagent: cannot create private mount/PID namespaces for containers "
            f"({probe.stderr.strip()}); run the agent as root (or with CAP_SYS_ADMIN)"
        )


def check_oci(runtime: str, store: str | None) -> None:
    """Exit with a clear message if the OCI mode lacks its runtime or its image store."""
    if shutil.which(runtime) is None:
        sys.exit(f"nodeagent: OCI runtime {runtime!r} not found (make image-tools installs crun)")
    if not store or not Path(store).is_dir():
        sys.exit(f"nodeagent: --image-store {store!r} is not a directory (make images fills one)")


def _parse_taint(text: str) -> JSON:
    key_value, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"taint {text!r}: expected KEY[=VALUE]:EFFECT")
    key, _, value = key_value.partition("=")
    taint: JSON = {"key": key, "effect": effect}
    if value:
        taint["value"] = value
    return taint


def _parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r}: expected KEY=VALUE")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kubetune_nodeagent", description="kubetune's node agent")
    p.add_argument("--kubeconfig", type=Path, required=True, help="kubeconfig of the cluster to join")
    p.add_argument("--node-name", default=DEFAULT_NODE_NAME, help="name of the Node (default %(default)s)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where pod directories and logs go (default .kubetune/nodes/<node-name>)",
    )
    p.add_argument("--gpus", type=int, default=1, help=f"{EXTENDED_GPU} to advertise (default %(default)s)")
    p.add_argument("--cpu", default=str(os.cpu_count() or 1), help="allocatable cpu (default: all cores)")
    p.add_argument("--memory", default=None, help="allocatable memory (default: the host's or the cgroup's)")
    p.add_argument("--pods", type=int, default=110, help="maximum pods (default %(default)s)")
    p.add_argument(
        "--image-map", type=Path, default=images.DEFAULT_TABLE, help="image table (default %(default)s)"
    )
    p.add_argument(
        "--label", type=_parse_label, action="append", default=[], help="extra node label KEY=VALUE"
    )
    p.add_argument(
        "--taint", type=_parse_taint, action="append", default=[], help="node taint KEY[=VALUE]:EFFECT"
    )
    p.add_argument("--scheduler-name", default="default-scheduler", help="bind pods of this scheduler")
    p.add_argument(
        "--no-bind", dest="bind", action="store_false", help="only run pods already assigned to this node"
    )
    p.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        help="first container restart delay, doubled per restart",
    )
    p.add_argument(
        "--no-memory-limits",
        dest="memory_limits",
        action="store_false",
        help="do not enforce limits.memory with memory cgroups",
    )
    p.add_argument(
        "--runtime",
        choices=("process", "oci"),
        default=os.environ.get("KUBETUNE_NODEAGENT_RUNTIME", "process"),
        help="process: commands as local processes (default); oci: images from --image-store under crun",
    )
    p.add_argument(
        "--image-store",
        type=Path,
        default=os.environ.get("KUBETUNE_IMAGE_STORE"),
        help="OCI mode: the image store make images fills (default $KUBETUNE_IMAGE_STORE)",
    )
    p.add_argument("--storage-driver", default="overlay", choices=("overlay", "vfs"), help="of --image-store")
    p.add_argument("--oci-runtime", default="crun", help="OCI mode: the runtime binary (default %(default)s)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between node heartbeats")
    p.add_argument(
        "--shutdown-grace", type=float, default=5.0, help="on SIGTERM, longest wait for pods to stop"
    )
    p.add_argument("--log-level", default="INFO")
    return p


def agent_from_args(args: argparse.Namespace) -> Agent:
    state_dir: Path = (args.state_dir or Path(".kubetune") / "nodes" / args.node_name).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    shape = NodeShape(
        name=args.node_name,
        cpu=str(args.cpu),
        memory=str(args.memory or host_memory_bytes()),
        pods=args.pods,
        gpus=args.gpus,
        labels=dict(args.label),
        taints=list(args.taint),
    )
    settings = AgentSettings(
        state_dir=state_dir,
        image_table=args.image_map,
        bind=args.bind,
        scheduler_name=args.scheduler_name,
        restart_backoff=args.restart_backoff,
        memory_limits=args.memory_limits,
        heartbeat=args.heartbeat,
        shutdown_grace=args.shutdown_grace,
        runtime=args.runtime,
        image_store=Path(args.image_store).resolve() if args.image_store else None,
        storage_driver=args.storage_driver,
        oci_runtime=args.oci_runtime,
    )
    return Agent(Kube.connect(args.kubeconfig), shape, settings)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s: %(message)s",
        stream=sys.stderr,
    )
    images.load_table(args.image_map)  # fail fast on a broken table
    check_namespaces()
    if args.runtime == "oci":
        check_oci(args.oci_runtime, args.image_store)
    agent = agent_from_args(args)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d", signum)
        agent.stop.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()


if __name__ == "__main__":
    main()
