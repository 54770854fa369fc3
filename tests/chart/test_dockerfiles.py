"""The operator and trainer Dockerfiles: hadolint clean and consistent with the project.

No Docker engine runs here, so the images are not built in tests; these checks keep the
Dockerfiles true to what the build needs: the lock file and extras they install from, the uv
version CI installs, pinned bases, a non-root user matching the chart, the ports the chart
probes, and a .dockerignore that lets every COPY source through.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from .conftest import dockerfile_instructions

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
DOCKERFILES = {
    "operator": REPO_ROOT / "Dockerfile",
    "trainer": REPO_ROOT / "trainer_image" / "Dockerfile",
}
MODULES = {"operator": "kubetune_operator", "trainer": "kubetune_trainer"}


def chart_values() -> dict[str, object]:
    values = yaml.safe_load((REPO_ROOT / "charts" / "kubetune" / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_clean(image: str) -> None:
    hadolint = VENV_BIN / "hadolint"
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILES[image])], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stdout.strip(), proc.stdout


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: an unpinned base and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # using latest
    assert "DL3008" in proc.stdout  # apt-get install without versions


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_installs_from_the_lock_with_its_extra(image: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[image])
    runs = [args for word, args in steps if word == "RUN"]
    # The lock stage exports the extra's pinned requirements (with hashes) from uv.lock; the
    # build stage installs exactly those, so the virtualenv's layers depend on nothing else.
    exports = [r for r in runs if "uv export" in r]
    assert len(exports) == 1, exports
    for flag in (
        "--frozen",
        f"--extra {image}",
        "--no-dev",
        "--no-emit-project",
        "--output-file requirements.txt",
    ):
        assert flag in exports[0], flag
    syncs = [r for r in runs if "uv pip sync" in r]
    assert len(syncs) == 1, syncs
    assert "uv pip sync --require-hashes requirements.txt" in syncs[0]
    assert ("COPY", "--from=lock /src/requirements.txt ./") in steps
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert image in extras
    copies = [args for word, args in steps if word == "COPY" and "--from" not in args]
    assert any("uv.lock" in c and "pyproject.toml" in c for c in copies)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_uv_matches_the_version_ci_installs(image: str) -> None:
    make_uv = re.search(r"^UV_VERSION \?= (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert make_uv, "Makefile has no UV_VERSION"
    pins = re.findall(r"uv==(\S+)", DOCKERFILES[image].read_text())
    assert pins == [make_uv.group(1)] * 2  # the lock stage's and the build stage's


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned(image: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[image])
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    froms = [a.split()[0] for w, a in steps if w == "FROM"]
    assert froms
    for written in froms:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], written)
        # python:3.11.<patch>-... or an @sha256 digest: never a floating tag.
        assert "@sha256:" in ref or re.fullmatch(r"python:3\.11\.\d+-slim-\w+", ref), ref


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runs_as_the_charts_non_root_user(image: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[image])
    users = [a for w, a in steps if w == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    values = chart_values()
    pod = values["podSecurityContext"]
    assert isinstance(pod, dict)
    assert int(uid) == pod["runAsUser"]
    assert int(gid) == pod["runAsGroup"]
    assert int(uid) != 0


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_entrypoint_runs_the_package(image: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[image])
    entry = [a for w, a in steps if w == "ENTRYPOINT"]
    assert entry == [f'["python", "-m", "{MODULES[image]}"]']
    package = next(REPO_ROOT.glob(f"*/{MODULES[image]}/__init__.py"))
    copied = [a for w, a in steps if w == "COPY" and "--from" not in a]
    assert any(str(package.parent.relative_to(REPO_ROOT)) in c for c in copied)


#: The packages each image copies: the API contract and its own package, never the other one's.
IMAGE_PACKAGES = {
    "operator": {"api/kubetune_api", "operator/kubetune_operator"},
    "trainer": {"api/kubetune_api", "trainer_image/kubetune_trainer"},
}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_each_image_copies_only_what_it_runs(image: str) -> None:
    steps = dockerfile_instructions(DOCKERFILES[image])
    copied = {a.split()[0] for w, a in steps if w == "COPY" and "--from" not in a}
    assert copied - {"pyproject.toml"} == IMAGE_PACKAGES[image]
    path = next(a for w, a in steps if w == "ENV" and "PYTHONPATH" in a)
    roots = {f"/app/{package.split('/')[0]}" for package in IMAGE_PACKAGES[image]}
    match = re.search(r"PYTHONPATH=(\S+)", path)
    assert match, path
    assert set(match.group(1).split(":")) == roots


def test_operator_exposes_the_charts_ports() -> None:
    steps = dockerfile_instructions(DOCKERFILES["operator"])
    exposed = {int(p) for w, a in steps if w == "EXPOSE" for p in a.split()}
    values = chart_values()
    metrics, health = values["metrics"], values["health"]
    assert isinstance(metrics, dict)
    assert isinstance(health, dict)
    assert exposed == {metrics["port"], health["port"]}


def test_trainer_default_command_reads_the_mounted_config() -> None:
    steps = dockerfile_instructions(DOCKERFILES["trainer"])
    assert [a for w, a in steps if w == "CMD"] == ['["--config", "/etc/kubetune/config.json"]']


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a '!' pattern re-includes."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(path, glob) or (glob.endswith("/**") and path.startswith(glob[:-3] + "/")):
            allowed = negate
    return allowed


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerignore_lets_every_copy_source_through(image: str) -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    steps = dockerfile_instructions(DOCKERFILES[image])
    sources = [s for w, a in steps if w == "COPY" and "--from" not in a for s in a.split()[:-1]]
    assert sources
    for source in sources:
        root = REPO_ROOT / source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        assert files, f"COPY source {source} does not exist"
        for file in files:
            rel = file.relative_to(REPO_ROOT).as_posix()
            if "__pycache__" in rel:
                continue
            assert _dockerignore_allows(rel, patterns), f".dockerignore excludes {rel} (COPY {source})"
    # The context stays small: the tests, the virtualenv and git history are not sent.
    for excluded in (".venv/bin/python", "tests/conftest.py", ".git/HEAD", "charts/kubetune/Chart.yaml"):
        assert not _dockerignore_allows(excluded, patterns), excluded


def test_trainer_image_has_what_the_operators_job_runs() -> None:
    """The Job's command (python, or accelerate's launcher for several GPUs) exists in the trainer
    image: python from the base image, accelerate from the locked `trainer` extra."""
    from kubetune_operator.builders import trainer_command

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    trainer_packages = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0] for req in extras["trainer"]}
    steps = dockerfile_instructions(DOCKERFILES["trainer"])
    path_env = next(a for w, a in steps if w == "ENV" and "PATH=/opt/venv/bin" in a)
    assert "PATH=/opt/venv/bin:$PATH" in path_env
    for gpus in (0, 1, 4):
        command = trainer_command(gpus)
        assert command[0] == "python", command
        modules = [command[i + 1] for i, arg in enumerate(command) if arg == "-m"]
        if gpus > 1:  # accelerate's launcher, through the trainer package's wrapper
            assert "accelerate" in trainer_packages
            assert modules == [f"{MODULES['trainer']}.launch", MODULES["trainer"]]
        else:
            assert modules == [MODULES["trainer"]]
