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
