"""Strict configuration loading: unknown keys fail, values are coerced, overrides apply."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from grpo.config import ConfigError, apply_overrides, from_dict, load_yaml, parse_override, to_dict


@dataclass
class Example:
    lr: float = 1e-4
    steps: int = 10
    method: str = "gr-dpo"
    groups: tuple[str, ...] = ("a", "b")
    lora: bool = False
    note: str | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")


def test_from_dict_coerces_yaml_and_cli_values():
    cfg = from_dict(Example, {"lr": "3e-5", "steps": 5, "groups": "x, y,z", "lora": "true"})
    assert (cfg.lr, cfg.steps, cfg.groups, cfg.lora) == (3e-5, 5, ("x", "y", "z"), True)
    assert from_dict(Example, None) == Example()


def test_unknown_key_names_section_and_key():
    with pytest.raises(ConfigError, match=r"params.yaml:train: unknown key\(s\) \['lrr'\]"):
        from_dict(Example, {"lrr": 1}, where="params.yaml:train")


def test_bad_type_and_validation_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.steps: expected an integer"):
        from_dict(Example, {"steps": 2.5}, where="train")
    with pytest.raises(ConfigError, match="steps must be positive"):
        from_dict(Example, {"steps": 0}, where="train")
    with pytest.raises(ConfigError, match=r"train\.lora: expected true/false"):
        from_dict(Example, {"lora": "maybe"}, where="train")


def test_overrides():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 1e-3)
    assert parse_override("data.groups=[a, b]") == (["data", "groups"], ["a", "b"])
    params = {"train": {"lr": 0.1}}
    out = apply_overrides(params, ["train.lr=0.5", "model.name_or_path=gpt2"])
    assert out == {"train": {"lr": 0.5}, "model": {"name_or_path": "gpt2"}}
    assert params == {"train": {"lr": 0.1}}  # the input is not modified
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("lr=0.1")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("train.lr")


def test_load_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line \d+, column \d+ invalid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


def test_to_dict_is_plain():
    assert to_dict(Example()) == {
        "lr": 1e-4,
        "steps": 10,
        "method": "gr-dpo",
        "groups": ["a", "b"],
        "lora": False,
        "note": None,
    }


# --- flows.params: the one way the commands read params.yaml ----------------------------------


def test_load_params_defaults_overrides_and_sections(tmp_path):
    from flows.params import load_params

    # an absent default file is the embedded defaults; any other missing file is an error
    assert load_params(tmp_path / "params.yaml", ["train.lr=0.5"]) == {"train": {"lr": 0.5}}
    assert load_params(None) == {}
    with pytest.raises(ConfigError, match=r"other\.yaml: no such params file"):
        load_params(tmp_path / "other.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n  beta: 0.2\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"params.yaml:modle: unknown section 'modle'; did you"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n  beta: 0.2\n")
    assert load_params(tmp_path / "params.yaml", ["train.lr=0.3"]) == {
        "train": {"lr": 0.3, "beta": 0.2}
    }
    with pytest.raises(ConfigError, match=r"--set trian.lr=0.3: unknown section 'trian'"):
        load_params(tmp_path / "params.yaml", ["trian.lr=0.3"])


def test_resolve_types_every_section_and_names_where_a_key_came_from():
    from flows.params import SECTIONS, resolve, section
    from grpo.data.sources import DataConfig
    from grpo.modeling import ModelConfig
    from grpo.trainer import TrainConfig
    from tasks.evaluate import EvaluateConfig
    from tasks.register import RegisterConfig
    from tasks.validate import ValidateConfig

    cfgs = resolve({"train": {"method": "dpo"}, "data": {"generated": {"n_pairs": 120}}})
    classes = (DataConfig, ValidateConfig, ModelConfig, TrainConfig, EvaluateConfig, RegisterConfig)
    for name, cls in zip(SECTIONS, classes, strict=True):
        assert isinstance(getattr(cfgs, name), cls), name
    assert cfgs.train.method == "dpo" and cfgs.data.generated.n_pairs == 120
    assert cfgs.resolved()["data"]["generated"]["n_pairs"] == 120
    assert set(cfgs.resolved()) == set(SECTIONS)
    with pytest.raises(ConfigError, match=r"params.yaml:train: unknown key 'lrr' in train"):
        resolve({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"my.yaml:register\.min_worst_group_accuracy"):
        section({"register": {"min_worst_group_accuracy": "high"}}, "register", "my.yaml")


def test_find_root_walks_up_to_the_project(tmp_path, monkeypatch):
    from flows.params import find_root, params_path

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_root() == find_root(deep) == tmp_path.resolve()
    # a file not found from the CWD is the project root's
    assert params_path("params.yaml", tmp_path) == tmp_path / "params.yaml"
    (deep / "mine.yaml").write_text("")
    assert params_path("mine.yaml", tmp_path) == (deep / "mine.yaml").resolve()


NO_PREFECT = """
import json, sys
from flows.cli import main
seen = {}
for argv in json.loads(sys.argv[1]):
    try:
        code = main(argv)
    except SystemExit as exc:  # --help
        code = exc.code
    seen[" ".join(argv[:2])] = [code, any(m.split(".")[0] == "prefect" for m in sys.modules)]
import flows.retrain  # the control: the orchestrating module does import it
seen["control"] = [0, any(m.split(".")[0] == "prefect" for m in sys.modules)]
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_commands_that_do_not_orchestrate_never_import_prefect(tmp_path):
    """`grpo audit`, promote, stage, ingest, validate, train and evaluate (help and real runs,
    in one fresh interpreter) leave Prefect unimported; importing the flow is the control."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    small = ["data.generated.n_pairs=120", "data.track=false", "train.max_steps=1",
             "train.epochs=0", "train.sft_epochs=0", "train.batch_size=6", "train.progress=false",
             "model.tokenizer_vocab_size=300", "evaluate.samples=0",
             "model.config={model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 16, n_positions: 128}"]  # fmt: skip
    sets = [a for o in small for a in ("--set", o)]
    helps = ("audit", "promote", "stage", "ingest", "validate", "train", "evaluate")
    pairs = "data/pairs.parquet"
    commands = [
        *[[name, "--help"] for name in helps],
        ["audit"],
        ["promote", "grpo-policy", "1"],
        ["stage", "ingest", *sets],
        ["stage", "validate", *sets],
        ["ingest", "--no-dvc", *sets],
        ["validate", pairs],
        ["train", "--data", pairs, "--out", "model", *sets],
        ["evaluate", "--model", "model/policy", "--reference", "model/reference", "--data", pairs],
        ["run", "--help"],  # parsing only: `grpo run` imports Prefect when it runs
    ]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
    (tmp_path / "params.yaml").write_text("")  # the project root: embedded defaults
    out = subprocess.run(
        [sys.executable, "-c", NO_PREFECT, json.dumps(commands)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {" ".join(c[:2]): 0 for c in commands} | {"control": 0}
    expected["audit"] = expected["promote grpo-policy"] = 1  # a new store: no registered model
    assert {k: v[0] for k, v in seen.items()} == expected, out.stderr[-3000:]
    imported = [k for k, (_, prefect) in seen.items() if prefect]
    assert imported == ["control"], imported
