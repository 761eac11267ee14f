"""Which pairs the evaluate stage scores: evaluate.max_pairs per group (stratified, seeded), and
the same pairs found again for re-scoring another model."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.evaluate import EvaluateConfig, evaluated_pairs, sample_per_group, split_pairs

# 10 pairs of a first, then 3 of b, then 6 of c (the old `head(max_pairs)` saw only a)
SIZES = {"a": 10, "b": 3, "c": 6}


def table(split: str = "test") -> pd.DataFrame:
    rows = [
        {"pair_id": f"{g}{i}", "question_id": f"q{i}", "group": g, "prompt": f"p {g} {i}",
         "chosen": "A", "rejected": "B", "split": split}
        for g, n in SIZES.items() for i in range(n)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_max_pairs_caps_every_group_and_drops_none():
    frame = table()
    picked = sample_per_group(frame, 4, seed=0)
    assert picked["group"].value_counts().to_dict() == {"a": 4, "c": 4, "b": 3}
    # a subset of the rows, kept in their original order
    positions = [frame.index[frame["pair_id"] == p][0] for p in picked["pair_id"]]
    assert positions == sorted(positions) and picked["pair_id"].is_unique
    assert sample_per_group(frame, 0, seed=0).equals(frame)  # 0 = all
    assert sample_per_group(frame, 100, seed=0).equals(frame)


def test_max_pairs_sample_is_seeded():
    frame = table()
    same = [sample_per_group(frame, 4, seed=7)["pair_id"].tolist() for _ in range(2)]
    assert same[0] == same[1]
    draws = {tuple(sample_per_group(frame, 4, seed=s)["pair_id"]) for s in range(5)}
    assert len(draws) > 1  # a sample, not the first rows of each group
    assert any("a9" in d or "a8" in d for d in draws)


def test_split_pairs_reads_one_split_then_samples(tmp_path):
    from grpo.data.schema import write_pairs

    path = write_pairs(pd.concat([table("test"), table("train").assign(
        pair_id=lambda f: "t" + f["pair_id"])]), tmp_path / "pairs.parquet")  # fmt: skip
    frame = split_pairs(path, EvaluateConfig(max_pairs=2, seed=1))
    assert set(frame["split"]) == {"test"}
    assert frame["group"].value_counts().to_dict() == {"a": 2, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="no pairs with split == 'validation'"):
        split_pairs(path, EvaluateConfig(split="validation"))
    with pytest.raises(ValueError, match="max_pairs"):
        EvaluateConfig(max_pairs=-1)


def test_evaluated_pairs_come_back_in_evaluation_order(tmp_path):
    from grpo.data.schema import write_pairs

    path = write_pairs(table(), tmp_path / "pairs.parquet")
    back = evaluated_pairs(path, {"pair_id": ["c5", "a0", "b2"]})
    assert back["pair_id"].tolist() == ["c5", "a0", "b2"]
    assert back["prompt"].tolist() == ["p c 5", "p a 0", "p b 2"]
    with pytest.raises(ValueError, match=r"1 evaluated pair\(s\) not in the table.*'zz'"):
        evaluated_pairs(path, {"pair_id": ["a0", "zz"]})
