"""The house rules that keep the product readable: short functions, a thin trainer pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("api/kubetune_api", "operator/kubetune_operator", "trainer_image/kubetune_trainer")
MAX_FUNCTION_LINES = 60
#: The trainer pipeline's stages read like trl's scripts/sft.py: a few dozen lines each.
MAX_STAGE_LINES = 40


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [
        (node.name, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


@pytest.mark.parametrize("package", PRODUCT)
def test_no_function_is_longer_than_60_lines(package: str) -> None:
    long = [
        f"{path.relative_to(REPO_ROOT)}:{name} ({lines} lines)"
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for name, lines in _functions(path)
        if lines > MAX_FUNCTION_LINES
    ]
    assert not long, f"split these: {long}"


def test_trainer_stages_are_short() -> None:
    stages = dict(_functions(REPO_ROOT / "trainer_image" / "kubetune_trainer" / "train.py"))
    for stage in ("run", "prepare", "prepare_data", "build", "train", "publish"):
        assert stages[stage] <= MAX_STAGE_LINES, f"train.{stage}: {stages[stage]} lines"
