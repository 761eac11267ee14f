"""A generated group-preference dataset: the embedded default, no network needed.

The situation the paper is about (Ramesh et al. 2024, §1): several groups answer the same
questions, a minority group prefers the *opposite* answer to the majority on most of them, and a
policy fitted to the pooled data (DPO) serves the majority and fails the minority. Here:

- **Questions** are survey-like sentences built from a topic, a framing and a context, e.g.
  ``"Should the government expand bus lines in small towns?"``. The answer options are an ordinal
  scale (``A. Strongly agree`` … ``D. Strongly disagree``); responses are the option letters.
- **The majority view** depends on the topic (a seeded stance, pro or anti, and an intensity,
  strong or mild) and the framing's polarity (``expand`` vs ``reduce``): its ideal option is
  one end of the scale for a strong stance, the next option inward for a mild one. The context
  never matters, so held-out questions (new topic × framing × context combinations) are
  answerable from what was learnt on others.
- **Minority groups** (those with a share below 1/K, else the last group) hold the mirror view
  (option ``n-1-i`` instead of ``i``) on a seeded fraction ``conflict`` of the topics; other
  groups after the first may dissent on a fraction ``dissent`` of the topics.
- **The prompt carries the group** in the paper's template
  ``Opinion of people in {group} on: {question}\\nPlease select the best response:`` followed by the
  lettered options and ``Answer:``. A group-blind policy can at best give the majority's answer,
  so the minority is served only by attending to the group in the prompt.
  ``group_in_prompt=False`` drops the group (``Question: {question}``): one policy for everyone.
- **Framings.** With ``negated_framings`` (the old default) half the framings are negated
  ("reduce", "ban"): the answer is the topic's stance times the framing's polarity, an
  interaction the tiny default model never learns (``docs/embedded-scenario.md``, "The old
  default showed nothing, and why"). Without them, a group's answer depends on the topic alone, which the model
  learns; what it cannot learn within its training budget is every group's view at once.
- **Difficulty** sets how far apart chosen and rejected are on the scale: 0 → the rejected option
  is the farthest from the chosen one, 1 → an adjacent one. ``noise`` swaps a seeded fraction
  of the pairs (label noise).

One pair per (group, question); splits are drawn by ``question_id`` (every group's questions of a
split come from that split's pool), so no question is in two splits. Same config and seed → the
same table, row for row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from grpo.data.prompts import LETTERS, format_prompt
from grpo.data.schema import COLUMNS, SPLITS
from grpo.data.splits import allocate, check_fractions

TOPICS: tuple[str, ...] = (
    "bus lines", "wind farms", "fishing quotas", "night markets", "public libraries",
    "road tolls", "school uniforms", "street lights", "tourist visas", "river dams",
    "city parks", "football clubs", "ferry routes", "mobile masts", "farm subsidies",
    "music festivals",
)  # fmt: skip
# (framing with {topic} and {context}, polarity): +1 when agreeing means being for the topic.
FRAMINGS: tuple[tuple[str, int], ...] = (
    ("Should the government expand {topic} {context}?", +1),
    ("Should the government reduce {topic} {context}?", -1),
    ("Do you support new {topic} {context}?", +1),
    ("Should {topic} be banned {context}?", -1),
    ("Should taxes pay for {topic} {context}?", +1),
    ("Are {topic} a waste of money {context}?", -1),
)
CONTEXTS: tuple[str, ...] = (
    "in the capital", "in small towns", "near the coast", "next year",
    "for young people", "for older people", "for families", "for visitors",
    "near schools", "for workers", "this winter", "in poor areas",
    "in rural areas", "in big cities", "near airports", "for students",
    "for farmers", "next summer", "in the old town", "near hospitals",
    "for commuters", "for children", "after the election", "in new suburbs",
)  # fmt: skip
OPTION_LABELS: dict[int, tuple[str, ...]] = {
    2: ("Agree", "Disagree"),
    3: ("Agree", "Neither agree nor disagree", "Disagree"),
    4: ("Strongly agree", "Somewhat agree", "Somewhat disagree", "Strongly disagree"),
    5: ("Strongly agree", "Agree", "Neither agree nor disagree", "Disagree", "Strongly disagree"),
}


@dataclass
class GeneratedConfig:
    """Settings of the generated dataset (``params.yaml`` → ``data.generated``)."""

    groups: tuple[str, ...] = ("Northland", "Southland", "Island")
    shares: tuple[float, ...] = (0.45, 0.40, 0.15)  # fraction of all pairs per group
    n_pairs: int = 2000
    n_options: int = 4
    difficulty: float = 0.0  # 0: rejected is the farthest option; 1: an adjacent option
    conflict: float = 0.5  # fraction of topics on which minority groups hold the mirror view
    dissent: float = 0.0  # same for the other non-first groups (majority groups disagreeing)
    noise: float = 0.0  # fraction of pairs with chosen and rejected swapped
    splits: tuple[float, ...] = (0.6, 0.2, 0.2)  # train / validation / test, by question
    seed: int = 0
    group_in_prompt: bool = True  # False: the prompt does not say who is asking
    negated_framings: bool = False  # True: also "reduce"/"ban" framings (stance × polarity)

    def __post_init__(self) -> None:
        self.groups = tuple(str(g) for g in self.groups)
        self.shares = tuple(float(s) for s in self.shares)
        if len(self.groups) < 2:
            raise ValueError(f"groups: need at least 2 groups, got {list(self.groups)}")
        if len(set(self.groups)) != len(self.groups) or any(not g.strip() for g in self.groups):
            raise ValueError(
                f"groups: names must be distinct and non-empty, got {list(self.groups)}"
            )
        if len(self.shares) != len(self.groups):
            raise ValueError(
                f"shares: {len(self.shares)} shares for {len(self.groups)} groups "
                f"{list(self.groups)}; give one share per group"
            )
        if any(s <= 0 for s in self.shares) or abs(sum(self.shares) - 1.0) > 1e-6:
            raise ValueError(f"shares: must be positive and sum to 1, got {list(self.shares)}")
        self.splits = check_fractions(self.splits)
        if self.n_options not in OPTION_LABELS:
            raise ValueError(
                f"n_options: must be one of {sorted(OPTION_LABELS)}, got {self.n_options}"
            )
        for name in ("difficulty", "conflict", "dissent", "noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value}")
        if self.n_pairs < 3 * len(self.groups):
            raise ValueError(
                f"n_pairs: at least {3 * len(self.groups)} (3 per group), got {self.n_pairs}"
            )

    @property
    def minority(self) -> tuple[str, ...]:
        """Groups with a share below 1/K (or the last group when the shares are equal)."""
        k = len(self.groups)
        small = tuple(
            g for g, s in zip(self.groups, self.shares, strict=True) if s < 1.0 / k - 1e-9
        )
        return small or (self.groups[-1],)


def question_bank() -> pd.DataFrame:
    """Every (topic, framing, context) question: columns question_id, topic, polarity, question."""
    rows = []
    for t, topic in enumerate(TOPICS):
        for f, (framing, polarity) in enumerate(FRAMINGS):
            for c, context in enumerate(CONTEXTS):
                index = (t * len(FRAMINGS) + f) * len(CONTEXTS) + c
                rows.append(
                    {
                        "question_id": f"q{index:04d}",
                        "topic": t,
                        "polarity": polarity,
                        "question": framing.format(topic=topic, context=context),
                    }
                )
    return pd.DataFrame(rows)


def group_views(cfg: GeneratedConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each group's ideal option index per (topic, polarity): {group: (n_topics, 2) int}.

    Column 0 is for polarity −1, column 1 for polarity +1.
    """
    n, n_topics = cfg.n_options, len(TOPICS)
    stance = rng.choice([-1, 1], size=n_topics)  # majority: for (+1) or against (−1) the topic
    mild = rng.random(n_topics) < 0.5 if n >= 4 else np.zeros(n_topics, dtype=bool)
    base = np.empty((n_topics, 2), dtype=int)
    for col, polarity in enumerate((-1, 1)):
        agree = stance * polarity > 0  # agreeing with the question = option 0 side
        end = np.where(agree, 0, n - 1)
        inward = np.where(agree, 1, n - 2)
        base[:, col] = np.where(mild, inward, end)
    minority = set(cfg.minority)
    views = {}
    for i, group in enumerate(cfg.groups):
        share = cfg.conflict if group in minority else (cfg.dissent if i > 0 else 0.0)
        flipped = rng.permutation(n_topics)[: round(share * n_topics)]
        view = base.copy()
        view[flipped] = n - 1 - view[flipped]
        views[group] = view
    return views


def rejected_option(
    chosen: int, n_options: int, difficulty: float, rng: np.random.Generator
) -> int:
    """An option at distance d = max(1, round((1−difficulty)(n−1))) from ``chosen`` (or the farthest)."""
    want = max(1, round((1.0 - difficulty) * (n_options - 1)))
    others = [o for o in range(n_options) if o != chosen]
    exact = [o for o in others if abs(o - chosen) == want]
    if exact:
        return int(exact[rng.integers(len(exact))]) if len(exact) > 1 else exact[0]
    return max(others, key=lambda o: (abs(o - chosen), -o))


def generate(cfg: GeneratedConfig | None = None) -> pd.DataFrame:
    """Build the canonical pair table (``grpo.data.schema.COLUMNS``), sorted by ``pair_id``.

    Group g gets ``allocate(n_pairs, shares)[g]`` pairs, split train/validation/test by
    ``allocate(n_g, splits)``, each from a distinct question of that split's question pool.
    """
    cfg = cfg or GeneratedConfig()
    rng = np.random.default_rng(cfg.seed)
    bank = question_bank()
    if not cfg.negated_framings:
        bank = bank[bank["polarity"] > 0].reset_index(drop=True)
    bank_rows = list(bank[["question_id", "topic", "polarity", "question"]].itertuples(index=False))
    views = group_views(cfg, rng)
    options = OPTION_LABELS[cfg.n_options]

    # Split the question bank by question, so a question lives in one split for every group.
    order = rng.permutation(len(bank))
    sizes = allocate(len(bank), cfg.splits)
    pools = np.split(order, np.cumsum(sizes)[:-1])

    rows = []
    for group, n_group in zip(cfg.groups, allocate(cfg.n_pairs, cfg.shares), strict=True):
        for split, pool, n_split in zip(SPLITS, pools, allocate(n_group, cfg.splits), strict=True):
            if n_split > len(pool):
                raise ValueError(
                    f"group {group!r} needs {n_split} {split} pairs but the {split} split has only "
                    f"{len(pool)} distinct questions; lower n_pairs (now {cfg.n_pairs}) or its share"
                )
            for q in np.sort(rng.choice(pool, size=n_split, replace=False)):
                qid, topic, polarity, question = bank_rows[int(q)]
                chosen = int(views[group][topic, int(polarity > 0)])
                rejected = rejected_option(chosen, cfg.n_options, cfg.difficulty, rng)
                if rng.random() < cfg.noise:
                    chosen, rejected = rejected, chosen
                rows.append(
                    {
                        "pair_id": f"{qid}-{group}",
                        "question_id": qid,
                        "group": group,
                        "prompt": format_prompt(
                            group if cfg.group_in_prompt else None, question, options
                        ),
                        "chosen": LETTERS[chosen],
                        "rejected": LETTERS[rejected],
                        "split": split,
                    }
                )
    table = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
    return table.sort_values("pair_id", kind="mergesort").reset_index(drop=True)
