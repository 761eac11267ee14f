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
        "source", "dir", "track", "push", "path", "groups", "splits", "seed", "generated",
        "globalopinionqa",
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
    line = '    "file": Source(None, build_file),\n'
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


VITAL = Path(__file__).resolve().parents[2] / "shared/data/globalopinionqa/goqa_vital.json"
FOUR = ("Pakistan", "Kenya", "Turkey", "Jordan")


@pytest.mark.skipif(not VITAL.is_file(), reason=f"GlobalOpinionQA VITAL file not found at {VITAL}")
def test_a_file_without_a_split_column_is_split_by_question_per_group(tmp_path):
    from grpo.data.globalopinionqa import build
    from grpo.data.splits import allocate

    pairs, _ = build(GlobalOpinionQAConfig(path=str(VITAL), groups=FOUR))
    assert len(pairs) == 154  # the table: 43 + 38 + 37 + 36 pairs
    path = tmp_path / "mine.jsonl"
    write_pairs(pairs.drop(columns=["split"]).assign(split=None), path)
    path.write_text(path.read_text().replace(', "split": null', ""))  # no split column at all
    cfg = DataConfig(source="file", path=str(path), splits=[0.8, 0.1, 0.1], seed=3)
    built, _, groups = build_pairs(cfg)
    assert groups == tuple(sorted(FOUR)) and len(built) == 154
    assert built.attrs["split_rule"].startswith(
        "by question, 80/10/10 (train/validation/test), seed 3"
    )
    assert "no split column" in built.attrs["split_rule"]
    counts = built.groupby(["group", "split"]).size().unstack(fill_value=0)
    for group in FOUR:  # every group within one pair of its own 80/10/10 targets
        n = int(counts.loc[group].sum())
        target = dict(
            zip(("train", "validation", "test"), allocate(n, (0.8, 0.1, 0.1)), strict=True)
        )
        for split, want in target.items():
            assert abs(int(counts.loc[group, split]) - want) <= 1, (group, split)
        assert counts.loc[group, "validation"] >= 3 and counts.loc[group, "test"] >= 3
    # no question in two splits, seeded
    assert built.groupby("question_id")["split"].nunique().max() == 1
    assert build_pairs(cfg)[0]["split"].tolist() == built["split"].tolist()
    other = build_pairs(DataConfig(source="file", path=str(path), seed=4))[0]
    assert other["split"].tolist() != built["split"].tolist()
    # a file with a split column keeps it
    write_pairs(pairs, tmp_path / "split.jsonl")
    kept, _, _ = build_pairs(DataConfig(source="file", path=str(tmp_path / "split.jsonl")))
    assert kept.set_index("pair_id")["split"].equals(
        pairs.set_index("pair_id")["split"].loc[kept["pair_id"]]
    )
    assert kept.attrs["split_rule"].startswith("the split column of")
