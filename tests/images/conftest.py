"""The image tests: the images ``make images`` built, run by a node agent in OCI mode (crun).

They run with ``make test-images`` (``pytest -m images tests/images``), not in ``make test``:
a plain ``pytest`` run skips them, and so does a machine without crun or without the images
(with the reason), unless ``KUBETUNE_IMAGE_TESTS=required`` (``.ci/run`` sets it after
``make images``): then what would skip them fails the run instead. The images are found through
``KUBETUNE_IMAGE_STORE``, else ``~/.cache/kubetune/images/current`` (the link
``hack/build-images.sh`` leaves).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

from kubetune_nodeagent.imagestore import ImageStore

VERSION = "0.1.0"
OPERATOR_IMAGE = f"ghcr.io/kubetune/operator:{VERSION}"
TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{VERSION}"


def image_store_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_IMAGE_STORE") or Path.home() / ".cache/kubetune/images/current")


REPO_ROOT = Path(__file__).resolve().parents[2]
API_PACKAGE = "api/kubetune_api"


def stale_api() -> str | None:
    """Why the images cannot run against this tree's CRD, or None: each image carries its own
    copy of the API contract (``/app/api/kubetune_api``), which must be this tree's, or the
    operator refuses what the tree's CRD defaults (the end-to-end test would wait for nothing)."""
    store = ImageStore(image_store_dir() / "root")
    for image in (OPERATOR_IMAGE, TRAINER_IMAGE):
        stored = store.lookup(image)
        if stored is None:
            return f"{image} is not in {image_store_dir()} (make images)"
        for source in sorted((REPO_ROOT / API_PACKAGE).rglob("*.py")):
            rel = source.relative_to(REPO_ROOT).as_posix()
            found = stored.find_file(f"/app/{rel}")
            if found is None or found.read_bytes() != source.read_bytes():
                return f"{image} was built from another API contract ({rel} differs): make images"
    return None


def images_required() -> bool:
    """CI built the images: an image test that cannot run is a failure, not a skip."""
    return os.environ.get("KUBETUNE_IMAGE_TESTS", "") == "required"


def unavailable(why: str) -> NoReturn:
    """Skip the image test that cannot run here, or fail it where the images are required."""
    if images_required():
        pytest.fail(f"KUBETUNE_IMAGE_TESTS=required, but {why}", pytrace=False)
    pytest.skip(why)


def missing_images() -> str | None:
    """Why the image tests cannot run here, or None."""
    if shutil.which("crun") is None:
        return "crun is not installed (make image-tools)"
    store = ImageStore(image_store_dir() / "root")
    for image in (OPERATOR_IMAGE, TRAINER_IMAGE):
        if store.lookup(image) is None:
            return f"{image} is not in {image_store_dir()} (make images)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "images: runs the images make images built, under the node agent's OCI mode (make test-images)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = "images" in (config.option.markexpr or "")
    why = None if not selected else missing_images()
    for item in items:
        if "images" not in item.keywords:
            continue
        if not selected:
            item.add_marker(pytest.mark.skip(reason="image tests run with make test-images (-m images)"))
        elif why is not None and images_required():
            raise pytest.UsageError(f"KUBETUNE_IMAGE_TESTS=required, but {why}")
        elif why is not None:
            item.add_marker(pytest.mark.skip(reason=why))
