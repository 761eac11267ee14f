"""Train/validation/test splits made by question, so no question is in two splits for any group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from grpo.data.schema import SPLITS


def allocate(total: int, fractions: Sequence[float]) -> list[int]:
    """Split ``total`` into integer parts ∝ ``fractions`` summing exactly to ``total``.

    Largest remainder: floor each share, then give the leftover units to the largest
    remainders (ties to the earlier entry). ``allocate(10, (0.45, 0.45, 0.1)) == [5, 4, 1]``.
    """
    raw = [total * f for f in fractions]
    parts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def check_fractions(fractions: Sequence[float], where: str = "splits") -> tuple[float, ...]:
    """Three positive fractions (train, validation, test) summing to 1, else ValueError."""
    out = tuple(float(f) for f in fractions)
    if len(out) != len(SPLITS) or any(f <= 0 for f in out) or abs(sum(out) - 1.0) > 1e-6:
        raise ValueError(
            f"{where}: need three positive fractions (train, validation, test) summing to 1, "
            f"got {list(out)}"
        )
    return out


def split_by_question(
    question_ids: Sequence[str], groups: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Assign every question to one split, each group's questions close to ``fractions``.

    Groups are visited from the smallest to the largest (ties by name); a group's questions not
    yet assigned (in a seeded random order) go one by one to the split furthest below the
    group's target counts ``allocate(n_group, fractions)``. The smallest group therefore gets
    its exact targets, larger groups approximately theirs, and a question shared by several
    groups is in one split for all of them. Returns {question_id: split}.
    """
    fractions = check_fractions(fractions)
    frame = pd.DataFrame({"question_id": list(question_ids), "group": list(groups)})
    per_group = {g: sorted(set(q)) for g, q in frame.groupby("group", sort=True)["question_id"]}
    rng = np.random.default_rng(seed)
    assigned: dict[str, str] = {}
    for group in sorted(per_group, key=lambda g: (len(per_group[g]), g)):
        questions = per_group[group]
        targets = allocate(len(questions), fractions)
        counts = [0] * len(SPLITS)
        for q in questions:
            if q in assigned:
                counts[SPLITS.index(assigned[q])] += 1
        for i in rng.permutation(len(questions)):
            q = questions[int(i)]
            if q in assigned:
                continue
            best = max(range(len(SPLITS)), key=lambda s: (targets[s] - counts[s], -s))
            assigned[q] = SPLITS[best]
            counts[best] += 1
    return assigned
