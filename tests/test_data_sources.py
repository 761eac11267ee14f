"""The data sources' one table: each registered source gets its params section, builds its pairs
and names its groups; a new source is one module plus one line in ``SOURCES``."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from grpo.config import ConfigError, from_dict, to_dict
from grpo.data import sources
from grpo.data.generated import GeneratedConfig
from grpo.data.globalopinionqa import GlobalOpinionQAConfig
from grpo.data.schema import COLUMNS, write_pairs
from grpo.data.sources import SOURCES, DataConfig, build_pairs


def test_params_shape_one_section_per_registered_source():
    assert list(SOURCES) == ["generated", "globalopinionqa", "file"]
    cfg = DataConfig()
    # the params.yaml shape: shared keys, then data.generated and data.globalopinionqa
    assert list(to_dict(cfg)) == [
        "source", "dir", "track", "push", "path", "groups", "generated", "globalopinionqa",
    ]  # fmt: skip
    assert cfg.generated == GeneratedConfig() and cfg.globalopinionqa == GlobalOpinionQAConfig()
    cfg = from_dict(
        DataConfig, {"source": "globalopinionqa", "globalopinionqa": {"groups": ["Japan"]}}
    )
    assert cfg.section() == GlobalOpinionQAConfig(groups=("Japan",))
    assert cfg.expected_groups() == ("Japan",)


def test_errors_name_the_source_key():
    with pytest.raises(
        ConfigError, match=r"source: must be one of \['generated', 'globalopinionqa', 'file'\]"
    ):
        from_dict(DataConfig, {"source": "nope"}, where="params.yaml:data")
    with pytest.raises(ConfigError, match=r"data\.generated: unknown key\(s\) \['typo'\]"):
        from_dict(DataConfig, {"generated": {"typo": 1}}, where="params.yaml:data")
    with pytest.raises(ConfigError, match=r"source=file needs data\.path"):
        from_dict(DataConfig, {"source": "file"}, where="params.yaml:data")


def _pairs(groups: list[str]) -> pd.DataFrame:
    rows = [
        {"pair_id": f"p{i}", "question_id": f"q{i}", "group": g, "prompt": f"x {i}",
         "chosen": "a", "rejected": "b", "split": "train"}
        for i, g in enumerate(groups)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_file_source_groups_from_the_config_or_the_file(tmp_path):
    write_pairs(_pairs(["b", "a", "b"]), tmp_path / "mine.parquet")
    cfg = DataConfig(source="file", path=str(tmp_path / "mine.parquet"))
    assert cfg.section() is None and cfg.expected_groups() is None
    pairs, table, groups = build_pairs(cfg)
    assert len(pairs) == 3 and table is None and groups == ("a", "b")
    cfg = DataConfig(source="file", path=str(tmp_path / "mine.parquet"), groups=["b", "c"])
    assert build_pairs(cfg)[2] == ("b", "c") == cfg.expected_groups()


# A new source, as a contributor would write it: a config with `groups` and a build function.
@dataclass
class ToyConfig:
    groups: tuple[str, ...] = ("x", "y")
    n: int = 2


def build_toy(cfg: ToyConfig) -> pd.DataFrame:
    return _pairs([g for g in cfg.groups for _ in range(cfg.n)])


def test_a_new_source_is_one_line_in_the_table():
    """sources.py with one added line (and the toy module's names in scope) has a `data.toy`
    section, accepts `source: toy`, and builds and validates the toy's pairs."""
    text = Path(sources.__file__).read_text(encoding="utf-8")
    line = '    "file": Source(None, read_pairs),\n'
    assert text.count(line) == 1
    patched = text.replace(line, '    "toy": Source(ToyConfig, build_toy),\n' + line)
    module = types.ModuleType("toy_sources")
    module.__dict__.update(ToyConfig=ToyConfig, build_toy=build_toy)
    sys.modules["toy_sources"] = module  # dataclasses look their module up
    try:
        exec(compile(patched, "toy_sources.py", "exec"), module.__dict__)
        cfg = from_dict(module.DataConfig, {"source": "toy", "toy": {"n": 3}}, where="data")
        assert cfg.toy == ToyConfig(n=3) and cfg.expected_groups() == ("x", "y")
        pairs, table, groups = module.build_pairs(cfg)
        assert list(pairs["group"]) == ["x"] * 3 + ["y"] * 3 and table is None
        assert groups == ("x", "y")
        assert to_dict(cfg)["toy"] == {"groups": ["x", "y"], "n": 3}
    finally:
        del sys.modules["toy_sources"]
