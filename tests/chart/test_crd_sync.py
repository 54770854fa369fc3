"""The chart's CRDs are byte-for-byte copies of crds/ (the single source of truth)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from .conftest import CHART_DIR, REPO_ROOT

SYNC = REPO_ROOT / "hack" / "sync-chart-crds.sh"


def test_chart_crds_match_the_source() -> None:
    sources = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    assert sources, "crds/ holds no CRD"
    for source in sources:
        copy = CHART_DIR / "crds" / source.name
        assert copy.exists(), f"charts/kubetune/crds/{source.name} missing: run hack/sync-chart-crds.sh"
        assert copy.read_bytes() == source.read_bytes(), (
            f"charts/kubetune/crds/{source.name} drifted from crds/: run hack/sync-chart-crds.sh"
        )
    proc = subprocess.run([str(SYNC), "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_chart_ships_exactly_the_source_crds() -> None:
    """The FineTuneJob CRD and kopf's peering CRDs, and nothing that is not in crds/."""
    names = set()
    for path in (CHART_DIR / "crds").glob("*.yaml"):
        assert (REPO_ROOT / "crds" / path.name).exists(), f"charts/kubetune/crds/{path.name} has no source"
        names |= {d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text()) if d}
    assert {"finetunejobs.kubetune.dev", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= names


def _fake_repo(tmp_path: Path) -> Path:
    """A copy of the bits the sync script touches, to try it without changing the repository."""
    root = tmp_path / "repo"
    (root / "hack").mkdir(parents=True)
    shutil.copy2(SYNC, root / "hack" / SYNC.name)
    shutil.copytree(REPO_ROOT / "crds", root / "crds")
    shutil.copytree(CHART_DIR / "crds", root / "charts" / "kubetune" / "crds")
    return root


def test_check_mode_reports_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path)
    script = root / "hack" / SYNC.name
    source = next((root / "crds").glob("*.yaml"))
    source.write_text(source.read_text() + "# an edit in the source of truth\n")
    stale = root / "charts" / "kubetune" / "crds" / "kubetune.dev_removed.yaml"
    stale.write_text("# a CRD whose source was deleted\n")

    proc = subprocess.run([str(script), "--check"], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert f"charts/kubetune/crds/{source.name} differs from crds/{source.name}" in proc.stderr
    assert "kubetune.dev_removed.yaml has no source in crds/" in proc.stderr

    proc = subprocess.run([str(script)], capture_output=True, text=True, check=True)
    assert (root / "charts" / "kubetune" / "crds" / source.name).read_bytes() == source.read_bytes()
    assert not stale.exists()
    assert sorted(p.name for p in (root / "charts" / "kubetune" / "crds").glob("*.yaml")) == sorted(
        p.name for p in (root / "crds").glob("*.yaml")
    )
    subprocess.run([str(script), "--check"], check=True, capture_output=True)
