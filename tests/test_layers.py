"""The layers import one way: grpo <- tasks <- flows; grpo never touches the MLOps stack."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_GRPO = {"prefect", "mlflow", "dvc", "great_expectations", "tasks", "flows"}
FORBIDDEN_IN_TASKS = {"flows"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def _offenders(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_roots(path) & forbidden
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_grpo_is_pure():
    assert (ROOT / "grpo" / "losses.py").exists()
    assert _offenders("grpo", FORBIDDEN_IN_GRPO) == {}


def test_tasks_do_not_import_flows():
    assert _offenders("tasks", FORBIDDEN_IN_TASKS) == {}


def test_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import mlflow\nfrom prefect import flow\n")
    assert _imported_roots(bad) >= {"mlflow", "prefect"}
