"""Building the Go tools: cache keys and the errors a newcomer sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_localenv import tools


def test_every_tool_has_a_pinned_version() -> None:
    versions = {name: tools.pinned_version(tool) for name, tool in tools.TOOLS.items()}
    assert versions["kube-apiserver"].startswith("v1.36.")
    assert versions["kubectl"] == versions["kube-apiserver"] == versions["kube-controller-manager"]
    assert versions["etcd"].startswith("v3.6.")
    assert versions["helm"].startswith("v4.")


def test_cache_lives_outside_the_repo_and_is_keyed_by_version() -> None:
    path = tools.tool_path("kube-apiserver")
    repo = Path(__file__).resolve().parents[2]
    assert repo not in path.parents
    assert tools.pinned_version(tools.TOOLS["kube-apiserver"]) in path.parent.name


def test_failed_build_names_the_module_and_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "broken"
    mod.mkdir()
    (mod / "go.mod").write_text(
        "module kubetune.dev/hack/tools/broken\n\ngo 1.26.0\n\nrequire sigs.k8s.io/kwok v0.0.999\n"
    )
    (mod / "go.sum").write_text("")
    broken = tools.GoTool("broken", str(mod), "sigs.k8s.io/kwok/cmd/kwok", "sigs.k8s.io/kwok")
    monkeypatch.setitem(tools.TOOLS, "broken", broken)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(tools.ToolBuildError, match=r"sigs\.k8s\.io/kwok@v0\.0\.999"):
        tools.build("broken", quiet=True)


def test_missing_go_gives_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_localenv", "build"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "KUBETUNE_GO": str(tmp_path / "no-go"), "HOME": str(tmp_path)},
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Go toolchain not found" in lines[0]
    assert "install Go" in lines[0]
