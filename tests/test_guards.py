"""What keeps caches honest and the registry serialised: checked against the code itself."""

import ast
import contextlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _grpo_imports(name: str, seen: set[str]) -> set[str]:
    """The top-level ``grpo/*.py`` modules ``name`` imports, transitively (lazy imports too)."""
    path = ROOT / "grpo" / f"{name}.py"
    if name in seen or not path.exists():
        return seen
    seen.add(name)
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grpo."):
            modules.append(node.module)
        elif isinstance(node, ast.Import):
            modules += [a.name for a in node.names if a.name.startswith("grpo.")]
        for module in modules:
            _grpo_imports(module.split(".")[1], seen)
    return seen


def test_the_training_cache_key_covers_every_module_training_and_evaluation_run():
    # grpo/reference.py, split out of trainer.py, was missing here: editing the reference policy
    # or its cached log-probs would have reused a cached model trained by the old code
    from flows.retrain import TRAINING_CODE

    used = set()
    for start in ("trainer", "evaluation", "samples"):
        _grpo_imports(start, used)
    missing = sorted(f"{m}.py" for m in used if f"{m}.py" not in TRAINING_CODE)
    assert not missing, f"flows.retrain.TRAINING_CODE lacks {missing}"


def test_the_registry_guard_always_holds_the_file_lock_and_takes_prefect_first(
    tmp_path, monkeypatch
):
    """With a shared Prefect server the guard used to take only Prefect's limit in `grpo run`
    while `grpo promote` took only the file lock: the two did not exclude each other."""
    from flows import stages
    from tasks.locks import release, try_lock
    from tasks.tracking import registry_lock

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    order = []

    @contextlib.contextmanager
    def limit():
        order.append("prefect")
        yield

    monkeypatch.setattr(stages, "prefect_api_url", lambda: "http://127.0.0.1:1/api")
    monkeypatch.setattr(stages, "_prefect_registry_limit", limit)
    lock = registry_lock(tmp_path)
    with stages.registry_guard(tmp_path):
        order.append("inside")
        assert try_lock(lock) is None  # held: another process's promote would wait
    assert order == ["prefect", "inside"]
    handle = try_lock(lock)  # released afterwards
    assert handle is not None
    release(handle)


def test_postgres_data_moves_to_the_temp_dir_when_the_postgres_user_cannot_reach_home(
    tmp_path, monkeypatch
):
    import subprocess

    from tools import services

    class Done:
        def __init__(self, code):
            self.returncode = code

    monkeypatch.setattr(services.os, "geteuid", lambda: 0)
    home = tmp_path / "closed" / ".services"
    for code, inside in ((0, True), (1, False)):
        services.postgres_dir.cache_clear()
        monkeypatch.setattr(subprocess, "run", lambda *a, code=code, **k: Done(code))
        folder = services.postgres_dir(home)
        assert folder.is_relative_to(home) is inside
        assert folder.name == "postgres"
    services.postgres_dir.cache_clear()
