"""The release workflow (.github/workflows/release.yaml) and what it relies on.

actionlint (built from the Go module proxy by ``kubetune_localenv.tools``, pinned in
hack/tools/actionlint) lints every workflow, and is shown to refuse a broken one; the version
check the workflow's first job runs (hack/check-release-versions.sh) passes for the chart's own
version and fails for a tag or a default image tag that differ; and every binary wheel in
uv.lock exists for both platforms the workflow builds, so the arm64 images can be built.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_localenv import tools

from .conftest import CHART_DIR, REPO_ROOT, Helm

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yaml"
CHECK = REPO_ROOT / "hack" / "check-release-versions.sh"


@pytest.fixture(scope="session")
def actionlint() -> Path:
    return tools.build("actionlint", quiet=True)


def lint(actionlint: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    # -shellcheck= / -pyflakes=: only actionlint's own checks, the same on every machine.
    argv = [str(actionlint), "-no-color", "-shellcheck=", "-pyflakes=", *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60, check=False)


def test_actionlint_passes_every_workflow(actionlint: Path) -> None:
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert RELEASE in files
    proc = lint(actionlint, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_refuses_a_broken_workflow(actionlint: Path, tmp_path: Path) -> None:
    """An unknown input of a known action and a job output that does not exist."""
    text = RELEASE.read_text()
    checkout = "      - uses: actions/checkout@v4\n"
    image = "IMAGE: ghcr.io/kubetune/${{ matrix.name }}:${{ needs.check.outputs.version }}"
    assert checkout in text
    assert image in text
    broken = text.replace(checkout, checkout + "        with:\n          fetch-deep: 1\n", 1)
    broken = broken.replace(image, "IMAGE: ${{ needs.check.outputs.no_such_output }}")
    path = tmp_path / ".github" / "workflows" / "broken.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(broken)
    proc = lint(actionlint, path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'input "fetch-deep" is not defined' in proc.stdout
    assert "no_such_output" in proc.stdout


def check_versions(helm: Helm, tag: str, chart: Path = CHART_DIR) -> subprocess.CompletedProcess[str]:
    env = dict(helm.env(), HELM=str(helm.binary), KUBETUNE_CHART=str(chart))
    return subprocess.run([str(CHECK), tag], capture_output=True, text=True, env=env, timeout=60, check=False)


def app_version() -> str:
    version: str = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    return version


def test_the_version_check_passes_for_the_charts_own_version(helm: Helm) -> None:
    version = app_version()
    proc = check_versions(helm, f"v{version}")
    assert proc.returncode == 0, proc.stderr
    assert f"ghcr.io/kubetune/operator:{version} and ghcr.io/kubetune/trainer:{version}" in proc.stdout


def test_the_version_check_fails_for_another_tag(helm: Helm) -> None:
    proc = check_versions(helm, "v9.9.9")
    assert proc.returncode == 1
    assert f"version is {app_version()}, the tag says 9.9.9" in proc.stderr
    assert check_versions(helm, app_version()).returncode == 1  # no leading v


def test_the_version_check_fails_when_a_default_image_tag_is_pinned_elsewhere(
    helm: Helm, tmp_path: Path
) -> None:
    chart = tmp_path / "kubetune"
    shutil.copytree(CHART_DIR, chart)
    values = chart / "values.yaml"
    text = values.read_text()
    pinned = text.replace('    tag: ""', '    tag: "0.0.1"', 1)
    first = text.index('    tag: ""')
    assert pinned != text
    assert text.index("trainer:") < first  # the first tag in values.yaml is the trainer's
    values.write_text(pinned)
    proc = check_versions(helm, f"v{app_version()}", chart)
    assert proc.returncode == 1
    assert "default trainer image is ghcr.io/kubetune/trainer:0.0.1" in proc.stderr


def _platforms() -> set[str]:
    workflow: dict[str, Any] = yaml.safe_load(RELEASE.read_text())
    steps = workflow["jobs"]["image"]["steps"]
    build = next(s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action"))
    return set(build["with"]["platforms"].split(","))


ARCH = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}


def test_every_binary_wheel_in_the_lock_exists_for_each_platform_the_workflow_builds() -> None:
    """uv sync --frozen in either image installs only wheels: a package with a Linux wheel for
    one architecture and not the other would break that platform's build."""
    platforms = _platforms()
    assert platforms == {"linux/amd64", "linux/arm64"}
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    missing = []
    for package in lock["package"]:
        names = [str(w["url"]).rsplit("/", 1)[-1] for w in package.get("wheels", [])]
        linux = [n for n in names if "linux" in n and ("cp311" in n or "-abi3-" in n or "-py3-none-" in n)]
        if not linux or any(n.endswith("-none-any.whl") for n in names):
            continue  # pure Python (a wheel for any platform), or not for Linux / this Python
        for platform in sorted(platforms):
            if not any(ARCH[platform] in n for n in linux):
                missing.append(f"{package['name']} {package['version']}: no {ARCH[platform]} wheel")
    assert not missing, missing
