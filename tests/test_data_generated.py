"""The generated dataset: sizes, splits, prompts, difficulty, conflict, determinism."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from grpo.data.generated import CONTEXTS, FRAMINGS, TOPICS, GeneratedConfig, generate
from grpo.data.schema import COLUMNS, SPLITS
from grpo.data.splits import allocate

LETTER = {c: i for i, c in enumerate("ABCDE")}


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return generate(GeneratedConfig())


def test_allocate_by_hand():
    assert allocate(10, (0.45, 0.45, 0.1)) == [5, 4, 1]  # 4.5, 4.5, 1.0: the tie goes first
    assert allocate(1600, (0.45, 0.40, 0.15)) == [720, 640, 240]
    assert allocate(240, (0.7, 0.15, 0.15)) == [168, 36, 36]
    assert sum(allocate(7, (1 / 3, 1 / 3, 1 / 3))) == 7


def test_sizes_per_group_and_split(table):
    assert list(table.columns) == list(COLUMNS)
    counts = table.groupby(["group", "split"]).size().to_dict()
    # 2000 × (0.45, 0.40, 0.15) = 900, 800, 300; each × (0.6, 0.2, 0.2)
    expected = {"Northland": (540, 180, 180), "Southland": (480, 160, 160), "Island": (180, 60, 60)}
    for group, sizes in expected.items():
        assert tuple(counts[(group, s)] for s in ("train", "validation", "test")) == sizes


def test_ids_unique_and_no_question_in_two_splits(table):
    assert table["pair_id"].is_unique
    assert list(table["pair_id"]) == sorted(table["pair_id"])
    assert table.groupby("question_id")["split"].nunique().max() == 1
    assert not table.duplicated(["group", "question_id"]).any()  # one pair per group and question
    assert set(table["split"]) == set(SPLITS)


def test_prompt_carries_the_group_and_options(table):
    for row in table.sample(50, random_state=0).itertuples():
        lines = row.prompt.split("\n")
        assert lines[0].startswith(f"Opinion of people in {row.group} on: ")
        assert lines[1] == "Please select the best response:"
        assert lines[2:] == [
            "A. Strongly agree",
            "B. Somewhat agree",
            "C. Somewhat disagree",
            "D. Strongly disagree",
            "Answer:",
        ]
        assert row.chosen in "ABCD" and row.rejected in "ABCD" and row.chosen != row.rejected


def test_same_seed_same_table_other_seed_other_table():
    a = generate(GeneratedConfig(seed=3))
    assert a.equals(generate(GeneratedConfig(seed=3)))
    assert not a.equals(generate(GeneratedConfig(seed=4)))


def _distance(frame):
    return (frame["chosen"].map(LETTER) - frame["rejected"].map(LETTER)).abs()


def test_difficulty_sets_the_distance_between_chosen_and_rejected():
    easy = generate(GeneratedConfig(difficulty=0.0))
    chosen = easy["chosen"].map(LETTER)
    farthest = pd.concat([chosen, 3 - chosen], axis=1).max(axis=1)  # 4 options: 0..3
    assert (_distance(easy) == farthest).all()
    hard = generate(GeneratedConfig(difficulty=1.0))
    assert (_distance(hard) == 1).all()
    mid = generate(GeneratedConfig(n_options=5, difficulty=0.5))  # round(0.5 × 4) = 2
    assert (_distance(mid) == 2).all()


def _topic_framing(question: str) -> str:
    """The question without its context: what the views depend on."""
    for context in CONTEXTS:
        question = question.replace(f" {context}?", "?")
    return question


def _blind_key(prompt: str) -> str:
    return _topic_framing(re.match(r"Opinion of people in .*? on: (.*)\n", prompt).group(1))


def test_a_group_blind_fit_serves_the_majority_only(table):
    """The best group-blind answer per (topic, framing), fitted on the pooled training pairs,
    is right for the two majority groups and wrong for most minority pairs; conditioning on the
    group fixes it. This is the situation GR-DPO is for."""
    assert len(TOPICS) * len(FRAMINGS) == 96  # 48 without the negated framings
    frame = table.assign(key=table["prompt"].map(_blind_key))
    train, test = frame[frame.split == "train"], frame[frame.split != "train"]
    pooled = train.groupby("key")["chosen"].agg(lambda s: s.value_counts().index[0])
    by_group = train.groupby(["group", "key"])["chosen"].agg(lambda s: s.value_counts().index[0])
    blind = (test["key"].map(pooled) == test["chosen"]).groupby(test["group"]).mean()
    aware = pd.Series(
        [by_group.get((g, k)) for g, k in zip(test["group"], test["key"], strict=True)],
        index=test.index,
    )
    seen = aware.notna()
    assert blind["Northland"] > 0.95 and blind["Southland"] > 0.95
    assert blind["Island"] < 0.6  # the minority agrees on half of the topics only
    assert (aware[seen] == test["chosen"][seen]).all()  # the group's own view is consistent
    assert seen.groupby(test["group"]).mean().min() > 0.7


def test_conflict_and_dissent_set_agreement_between_groups():
    def agreement(cfg, a, b):
        t = generate(cfg).pivot(index="question_id", columns="group", values="chosen")
        both = t[[a, b]].dropna()
        return (both[a] == both[b]).mean()

    assert agreement(GeneratedConfig(conflict=0.0), "Northland", "Island") == 1.0
    assert agreement(GeneratedConfig(conflict=1.0), "Northland", "Island") == 0.0
    assert agreement(GeneratedConfig(), "Northland", "Southland") == 1.0
    assert agreement(GeneratedConfig(dissent=1.0), "Northland", "Southland") == 0.0


def test_noise_swaps_about_that_share_of_pairs():
    clean, noisy = generate(GeneratedConfig()), generate(GeneratedConfig(noise=0.1))
    swapped = (clean["chosen"] == noisy["rejected"]) & (clean["rejected"] == noisy["chosen"])
    assert (swapped | (clean["chosen"] == noisy["chosen"])).all()
    assert 0.07 < swapped.mean() < 0.13  # 2000 draws: sd of the share ≈ 0.0067


def test_minority_is_the_small_share_or_the_last_group():
    assert GeneratedConfig().minority == ("Island",)
    assert GeneratedConfig(groups=("a", "b"), shares=(0.5, 0.5), n_pairs=200).minority == ("b",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shares": (0.5, 0.5, 0.5)}, "shares"),
        ({"shares": (0.5, 0.5)}, "2 shares for 3 groups"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"groups": ("a", "a", "b")}, "distinct"),
        ({"n_options": 9}, "n_options"),
        ({"splits": (0.8, 0.2)}, "splits"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GeneratedConfig(**kwargs)


def test_too_many_pairs_for_the_question_bank():
    with pytest.raises(ValueError, match="distinct questions"):
        generate(GeneratedConfig(n_pairs=10_000))


def test_framings_and_the_group_blind_prompt():
    """Without negated framings every question's agreeing answer is the pro-topic one; with them
    half the framings are negated. A group-blind prompt never names a group."""
    negated = ("government reduce", "be banned", "a waste of money")  # FRAMINGS with polarity −1
    assert len(negated) == sum(polarity < 0 for _, polarity in FRAMINGS)
    plain = generate(GeneratedConfig())
    assert not any(w in p for p in plain["prompt"] for w in negated)
    old = generate(GeneratedConfig(negated_framings=True, n_pairs=1600, splits=(0.7, 0.15, 0.15)))
    assert all(any(w in p for p in old["prompt"]) for w in negated)
    blind = generate(GeneratedConfig(group_in_prompt=False))
    assert all(p.startswith("Question: ") for p in blind["prompt"])
    assert not any(g in p for g in ("Northland", "Southland", "Island") for p in blind["prompt"])
    # the same pairs otherwise: only the prompt's first line differs
    assert (blind["chosen"] == plain["chosen"]).all() and (blind["split"] == plain["split"]).all()
