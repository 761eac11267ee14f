"""GlobalOpinionQA: both input formats, pair construction by hand, splits, bad input, real subset."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from grpo.data.globalopinionqa import (
    PAPER_COUNTRIES,
    GlobalOpinionQAConfig,
    bare_question,
    build,
    choose_pair,
    load_hub,
    pairs_from_source,
    question_key,
    read_distributional,
)
from grpo.data.schema import COLUMNS, DataFormatError
from grpo.data.splits import split_by_question

SHARED = Path(__file__).resolve().parents[2] / "shared/data/globalopinionqa"


def distributional_item(qid, country, question, options, shares):
    letters = " ".join(f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options))
    return {
        "question": f"Question: {question}\nOptions: {letters}\nAnswer:",
        "options": options,
        "attribute": country,
        "gold_distribution": shares,
        "pred_distribution": None,
        "id": qid,
    }


def write_distributional(path: Path, items) -> Path:
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    return path


def test_bare_question_strips_the_distributional_framing():
    text = "Question: Is it good?\nOptions: A. Yes B. No\nAnswer:"
    assert bare_question(text) == "Is it good?"
    assert bare_question("  Just a question  ") == "Just a question"


def test_pairs_from_a_hand_made_distributional_file(tmp_path):
    path = write_distributional(
        tmp_path / "d.json",
        [
            distributional_item(
                7, "Japan", "Is tea good?", ["Yes", "No", "Unsure"], [0.2, 0.5, 0.3]
            ),
            distributional_item(
                7, "Nigeria", "Is tea good?", ["Yes", "No", "Unsure"], [0.6, 0.1, 0.3]
            ),
            distributional_item(8, "Japan", "Rain?", ["Often", "Never"], [0.3, 0.7]),
            distributional_item(8, "Peru", "Rain?", ["Often", "Never"], [0.9, 0.1]),
        ],
    )
    cfg = GlobalOpinionQAConfig(path=str(path), groups=("Japan", "Nigeria"))
    pairs, source = build(cfg)
    assert list(pairs.columns) == list(COLUMNS)
    # question ids by the documented rule, from the normalised (case-folded) text and options
    tea = "q" + sha256_hex("is tea good?\x1fyes\x1eno\x1eunsure")[:12]
    rain = "q" + sha256_hex("rain?\x1foften\x1enever")[:12]
    expected_ids = sorted([f"{tea}-Japan", f"{tea}-Nigeria", f"{rain}-Japan"])  # Peru not asked
    assert list(pairs["pair_id"]) == expected_ids
    by_id = pairs.set_index("pair_id")
    assert by_id.loc[f"{tea}-Japan", "prompt"] == (
        "Opinion of people in Japan on: Is tea good?\n"
        "Please select the best response:\nA. Yes\nB. No\nC. Unsure\nAnswer:"
    )
    assert by_id.loc[f"{tea}-Japan", "chosen"] == "B"  # argmax of (0.2, 0.5, 0.3)
    assert by_id.loc[f"{tea}-Japan", "rejected"] in {"A", "C"}
    assert by_id.loc[f"{tea}-Nigeria", "chosen"] == "A"
    assert by_id.loc[f"{tea}-Nigeria", "rejected"] in {"B", "C"}
    assert (by_id.loc[f"{rain}-Japan", "chosen"], by_id.loc[f"{rain}-Japan", "rejected"]) == (
        "B",
        "A",
    )
    assert by_id.loc[f"{tea}-Japan", "question_id"] == tea
    assert len(source) == 3 and set(source["group"]) == {"Japan", "Nigeria"}


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_question_key_is_the_content_not_the_row(tmp_path):
    base = question_key("Is tea good?", ["Yes", "No"])
    assert question_key("  is  TEA\ngood? ", ["yes ", " NO"]) == base  # spacing and case
    assert question_key("Is tea good?", ["No", "Yes"]) != base  # options in another order
    assert question_key("Is tea good?", ["Yes", "No", "Unsure"]) != base
    assert question_key("Is coffee good?", ["Yes", "No"]) != base
    # different row ids, same question: one question_id; both formats agree on it
    path = write_distributional(
        tmp_path / "d.json",
        [
            distributional_item(11, "Japan", "Is tea good?", ["Yes", "No"], [0.4, 0.6]),
            distributional_item(12, "Peru", "Is tea good?", ["Yes", "No"], [0.7, 0.3]),
        ],
    )
    source = read_distributional(path)
    assert list(source["question_id"]) == [base, base]
    hub = _hub_csv(tmp_path / "h.csv", [("Is tea good?", {"Japan": [0.4, 0.6]}, ["Yes", "No"])] * 2)
    hub_source = load_hub(hub)
    assert list(hub_source["question_id"]) == [base, base]
    # the Hub file asks it twice for Japan: one pair, from the first row
    pairs = pairs_from_source(hub_source, ["Japan"], seed=0, splits=(0.8, 0.1, 0.1))
    assert list(pairs["pair_id"]) == [f"{base}-Japan"]


def test_argmax_ties_go_to_the_first_option_and_rejected_is_uniform():
    rng = np.random.default_rng(0)
    assert choose_pair([0.4, 0.4, 0.2], rng)[0] == 0
    draws = [choose_pair([0.7, 0.1, 0.1, 0.1], rng)[1] for _ in range(3000)]
    counts = np.bincount(draws, minlength=4)
    assert counts[0] == 0  # never the chosen option
    assert all(900 < c < 1100 for c in counts[1:])  # 1000 each expected, sd ≈ 26


def _hub_csv(path: Path, rows) -> Path:
    """The Hub's own CSV format: selections and options are strings holding Python literals."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "selections", "options", "source"])
        for question, selections, options in rows:
            writer.writerow(
                [question, f"defaultdict(<class 'list'>, {selections!r})", repr(options), "GAS"]
            )
    return path


def test_hub_format_through_datasets(tmp_path):
    path = _hub_csv(
        tmp_path / "global_opinions.csv",
        [
            ("Do you like rain?", {"Nigeria": [0.1, 0.9], "Japan": [0.7, 0.3]}, ["Yes", "No"]),
            ("Which is best?", {"Japan": [0.2, 0.2, 0.6]}, ["X", "Y's", "Z"]),
        ],
    )
    source = load_hub(path)
    assert list(source["group"]) == ["Nigeria", "Japan", "Japan"]
    assert source.loc[2, "options"] == ["X", "Y's", "Z"]
    assert source.loc[2, "shares"] == [0.2, 0.2, 0.6]
    rain = "q" + sha256_hex("do you like rain?\x1fyes\x1eno")[:12]
    best = "q" + sha256_hex("which is best?\x1fx\x1ey's\x1ez")[:12]
    assert list(source["question_id"]) == [rain, rain, best]
    pairs = pairs_from_source(source, ["Nigeria", "Japan"], seed=0, splits=(0.8, 0.1, 0.1))
    got = pairs.set_index("pair_id")[["chosen", "rejected"]].to_dict("index")
    assert got == {
        f"{rain}-Japan": {"chosen": "A", "rejected": "B"},
        f"{rain}-Nigeria": {"chosen": "B", "rejected": "A"},
        f"{best}-Japan": got[f"{best}-Japan"],
    }
    assert got[f"{best}-Japan"]["chosen"] == "C"
    assert got[f"{best}-Japan"]["rejected"] in {"A", "B"}
    prompt = pairs.set_index("pair_id").loc[f"{rain}-Nigeria", "prompt"]
    assert prompt.startswith("Opinion of people in Nigeria on: Do you like rain?\n")
    # the auto format detection sends a CSV to the Hub reader
    cfg = GlobalOpinionQAConfig(path=str(path), groups=("Japan",))
    assert len(build(cfg)[0]) == 2


def test_hub_offline_fails_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataFormatError, match=r"offline, set data\.globalopinionqa\.path"):
        load_hub(None, "Anthropic/llm_global_opinions")


def test_a_pair_does_not_change_when_countries_are_added(tmp_path):
    items = [
        distributional_item(q, c, f"Q{q}?", ["a", "b", "c", "d"], [0.4, 0.3, 0.2, 0.1])
        for q in range(20)
        for c in ("Japan", "China")
    ]
    path = write_distributional(tmp_path / "d.json", items)
    one = build(GlobalOpinionQAConfig(path=str(path), groups=("Japan",)))[0]
    two = build(GlobalOpinionQAConfig(path=str(path), groups=("Japan", "China")))[0]
    merged = one.merge(two, on="pair_id", suffixes=("", "_2"))
    assert len(merged) == 20 and (merged["rejected"] == merged["rejected_2"]).all()


def test_split_by_question_hand_example():
    # group a: 10 questions, b: the same 10 + 10 of its own. a is smaller, so it gets 8/1/1 exactly.
    qa = [f"q{i}" for i in range(10)]
    qb = qa + [f"r{i}" for i in range(10)]
    assignment = split_by_question(qa + qb, ["a"] * 10 + ["b"] * 20, (0.8, 0.1, 0.1), seed=1)
    a_counts = pd.Series([assignment[q] for q in qa]).value_counts().to_dict()
    b_counts = pd.Series([assignment[q] for q in qb]).value_counts().to_dict()
    assert a_counts == {"train": 8, "validation": 1, "test": 1}
    assert b_counts == {"train": 16, "validation": 2, "test": 2}


def test_shared_questions_never_cross_splits(tmp_path):
    rng = np.random.default_rng(5)
    items = []
    for q in range(200):
        for c in PAPER_COUNTRIES:
            if rng.random() < 0.7:
                shares = rng.dirichlet(np.ones(4)).tolist()
                items.append(distributional_item(q, c, f"Q{q}?", ["a", "b", "c", "d"], shares))
    path = write_distributional(tmp_path / "d.json", items)
    pairs = build(GlobalOpinionQAConfig(path=str(path)))[0]
    assert pairs.groupby("question_id")["split"].nunique().max() == 1
    shares = pairs.groupby("group")["split"].value_counts(normalize=True).unstack()
    assert ((shares["train"] - 0.8).abs() < 0.05).all()
    assert ((shares["test"] - 0.1).abs() < 0.05).all()


def test_distributional_errors_name_item_and_field(tmp_path):
    item = distributional_item(1, "Japan", "Q?", ["a", "b"], [0.5, 0.5])
    del item["gold_distribution"]
    path = write_distributional(
        tmp_path / "d.json", [distributional_item(0, "Japan", "Q?", ["a", "b"], [1, 0]), item]
    )
    with pytest.raises(
        DataFormatError, match=r"d.json: item 1: missing field\(s\) \['gold_distribution'\]"
    ):
        read_distributional(path)
    bad = distributional_item(0, "Japan", "Q?", ["a", "b"], ["x", 0.5])
    path = write_distributional(tmp_path / "e.json", [bad])
    with pytest.raises(DataFormatError, match=r"e\.json: item 0, field 'gold_distribution'"):
        read_distributional(path)
    path = tmp_path / "f.json"
    path.write_text('[{"question": "Q",\n "options": [}]')
    with pytest.raises(DataFormatError, match=r"f\.json: line 2, column 14: invalid JSON"):
        read_distributional(path)


def test_hub_errors_name_row_and_field(tmp_path):
    path = tmp_path / "hub.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "selections", "options", "source"])
        writer.writerow(
            ["Q?", "defaultdict(<class 'list'>, {'Japan': [0.5, 0.5]})", "['a', 'b']", "GAS"]
        )
        writer.writerow(
            ["Q2?", "defaultdict(<class 'list'>, {'Japan': [0.5, 0.5}", "['a', 'b']", "GAS"]
        )
    with pytest.raises(
        DataFormatError, match=r"hub.csv: row 1, field 'selections': not a Python literal"
    ):
        load_hub(path)


def test_unknown_country_is_reported_with_the_known_ones(tmp_path):
    path = write_distributional(
        tmp_path / "d.json", [distributional_item(0, "Japan", "Q?", ["a", "b"], [0.5, 0.5])]
    )
    with pytest.raises(DataFormatError, match=r"group\(s\) \['Nigera'\] have no rows"):
        build(GlobalOpinionQAConfig(path=str(path), groups=("Japan", "Nigera")))


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"GlobalOpinionQA subset not found at {SHARED}")
def test_real_subset_five_countries_pairs():
    cfg = GlobalOpinionQAConfig(path=str(SHARED / "goqa_subset.json"))
    pairs, _ = build(cfg)
    counts = pairs["group"].value_counts().to_dict()
    # the README's row counts for the paper's five countries
    assert counts == {
        "Nigeria": 73,
        "Egypt": 91,
        "India (Current national sample)": 79,
        "China": 37,
        "Japan": 105,
    }
    assert pairs.groupby("question_id")["split"].nunique().max() == 1
    assert (pairs["chosen"] != pairs["rejected"]).all()
    # chosen is the argmax of each row's shares (recomputed here from the raw file)
    argmax = {
        raw_prompt(r): "ABCDEFGHIJ"[int(np.argmax(r["gold_distribution"]))]
        for r in real_rows(PAPER_COUNTRIES)
    }
    assert pairs.set_index("prompt")["chosen"].to_dict() == argmax


def real_rows(countries) -> list[dict]:
    raw = json.loads((SHARED / "goqa_subset.json").read_text())
    return [r for r in raw if r["attribute"] in countries]


def raw_prompt(row: dict) -> str:
    """The paper's prompt for a raw distributional row, built here from the file's fields."""
    question = row["question"].split("\nOptions:")[0].removeprefix("Question:").strip()
    options = [f"{'ABCDEFGHIJ'[i]}. {o}" for i, o in enumerate(row["options"])]
    return "\n".join(
        [
            f"Opinion of people in {row['attribute']} on: {question}",
            "Please select the best response:",
            *options,
            "Answer:",
        ]
    )


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"GlobalOpinionQA subset not found at {SHARED}")
def test_real_subset_splits_by_question_text_across_countries():
    pairs, _ = build(GlobalOpinionQAConfig(path=str(SHARED / "goqa_subset.json")))
    split_of = pairs.set_index("prompt")["split"].to_dict()
    splits: dict[tuple, set[str]] = {}
    countries: dict[tuple, set[str]] = {}
    for r in real_rows(PAPER_COUNTRIES):
        key = (r["question"], tuple(r["options"]))  # the raw text, framing included
        splits.setdefault(key, set()).add(split_of[raw_prompt(r)])
        countries.setdefault(key, set()).add(r["attribute"])
    multi = [k for k, c in countries.items() if len(c) > 1]
    assert len(countries) == 319 and len(multi) == 61  # 61 asked in 2 or 3 of the countries
    assert all(len(splits[k]) == 1 for k in multi)
    # per country: the largest-remainder targets of n × (0.8, 0.1, 0.1), worked out by hand;
    # China, the smallest, gets them exactly (visited first), the others within one pair
    targets = {
        "China": (29, 4, 4),  # 29.6, 3.7, 3.7 → 29, 3, 3 + 2 to the .7s
        "Nigeria": (59, 7, 7),  # 58.4, 7.3, 7.3 → 58, 7, 7 + 1 to the .4
        "India (Current national sample)": (63, 8, 8),  # 63.2, 7.9, 7.9
        "Egypt": (73, 9, 9),  # 72.8, 9.1, 9.1
        "Japan": (84, 11, 10),  # 84, 10.5, 10.5: the tie to the earlier split
    }
    counts = pairs.groupby(["group", "split"]).size()
    for country, want in targets.items():
        got = tuple(int(counts.get((country, s), 0)) for s in ("train", "validation", "test"))
        if country == "China":
            assert got == want
        assert all(abs(g - w) <= 1 for g, w in zip(got, want, strict=True)), (country, got)


def test_parse_literal_reads_bare_nan_as_missing_but_keeps_answer_texts():
    from grpo.data.globalopinionqa import parse_literal

    text = "defaultdict(<class 'list'>, {'Japan': [0.5, nan], 'Peru': [1.0, 0.0]})"
    assert parse_literal(text, "w") == {"Japan": [0.5, None], "Peru": [1.0, 0.0]}
    assert parse_literal("['the nan bread', \"Don't know\"]", "w") == [
        "the nan bread",
        "Don't know",
    ]
    source = pd.DataFrame(
        {
            "question_id": ["0", "1"],
            "group": ["Japan", "Japan"],
            "question": ["q", "q"],
            "options": [["a", "b"], ["a", "b"]],
            "shares": [[0.5, float("nan")], [0.2, 0.8]],
            "where": ["w0", "w1"],
        }
    )
    pairs = pairs_from_source(source, ["Japan"], seed=0, splits=(0.8, 0.1, 0.1))
    assert list(pairs["pair_id"]) == ["1-Japan"]  # the NaN row gives no pair (validation flags it)
