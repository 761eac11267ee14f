"""Samples a user can read: every option of a few held-out questions, scored by the policy.

A tiny policy's greedy completions say nothing (mostly empty strings); what preference training
changes is how the policy *ranks* answers. For a few test pairs per group, each of the
question's options y is scored as a response to the prompt x:

    log π_θ(y|x), log π_ref(y|x)    summed response log-probs (:func:`grpo.evaluation.pair_logps`)
    r(x, y) = β (log π_θ(y|x) − log π_ref(y|x))    the implicit reward (DPO, Rafailov et al. eq. 5)

The options are the prompt's lettered lines (``A. ...``, :func:`grpo.data.prompts.format_prompt`),
each scored as its letter, the response format of the built-in sources; a prompt without them
has two options, the pair's own chosen and rejected responses. Each sample marks the chosen and
rejected option and says where the policy ranks the chosen one by implicit reward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


def parse_options(prompt: str) -> list[tuple[str, str]]:
    """``[(letter, text), ...]`` of the prompt's lettered lines, in order.

    Only a run ``A., B., C., ...`` counts (a line that merely starts like one elsewhere in the
    question does not); ``[]`` when the prompt has no such run.
    """
    options: list[tuple[str, str]] = []
    for line in str(prompt).splitlines():
        match = OPTION_LINE.match(line.strip())
        if match and ord(match.group(1)) - ord("A") == len(options):
            options.append((match.group(1), match.group(2)))
        elif options:
            break
    return options


def candidates(row: Any) -> list[tuple[str, str]]:
    """``[(response, label), ...]``: the lettered options when chosen and rejected are two of
    them, else the pair's own two responses (labelled by the response text)."""
    options = parse_options(row.prompt)
    letters = [letter for letter, _ in options]
    if row.chosen in letters and row.rejected in letters:
        return options
    return [(str(row.chosen), str(row.chosen)), (str(row.rejected), str(row.rejected))]


def pick_pairs(frame: pd.DataFrame, per_group: int) -> pd.DataFrame:
    """The first ``per_group`` pairs of each group by ``pair_id`` (a stable choice across runs)."""
    if per_group <= 0 or frame.empty:
        return frame.iloc[:0]
    ordered = frame.sort_values(["group", "pair_id"], kind="mergesort")
    return ordered.groupby("group", sort=True).head(per_group).reset_index(drop=True)


def option_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """One row per (pair, option): ``sample`` (row of ``pairs``), ``group``, ``prompt``,
    ``response``, ``label``; ``chosen``/``rejected`` both hold ``response``, so
    :func:`grpo.evaluation.pair_logps` scores it (its second score is then ignored)."""
    rows = []
    for index, row in enumerate(pairs.itertuples(index=False)):
        for response, label in candidates(row):
            rows.append(
                {"sample": index, "group": row.group, "prompt": row.prompt,
                 "response": response, "label": label, "chosen": response, "rejected": response}
            )  # fmt: skip
    return pd.DataFrame(rows)


def assemble(
    pairs: pd.DataFrame,
    options: pd.DataFrame,
    policy_logps: Sequence[float],
    reference_logps: Sequence[float],
    beta: float,
) -> list[dict[str, Any]]:
    """The samples from the scored option rows (``policy_logps``/``reference_logps``: (R,) in
    the row order of ``options``)."""
    options = options.assign(policy_logp=list(policy_logps), reference_logp=list(reference_logps))
    samples = []
    for index, row in enumerate(pairs.itertuples(index=False)):
        scored = []
        for opt in options[options["sample"] == index].itertuples(index=False):
            reward = beta * (opt.policy_logp - opt.reference_logp)
            mark = {row.chosen: "chosen", row.rejected: "rejected"}.get(opt.response, "")
            scored.append(
                {"response": opt.response, "text": opt.label, "mark": mark,
                 "policy_logp": float(opt.policy_logp),
                 "reference_logp": float(opt.reference_logp), "reward": float(reward)}
            )  # fmt: skip
        samples.append(summarize(row, scored))
    return samples


def summarize(row: Any, scored: list[dict[str, Any]]) -> dict[str, Any]:
    """One sample: the pair, its scored options, the chosen option's rank by implicit reward
    (1 + the number of options with a strictly higher reward) and the policy's top option."""
    chosen = next(o for o in scored if o["mark"] == "chosen")
    rejected = next(o for o in scored if o["mark"] == "rejected")
    rank = 1 + sum(o["reward"] > chosen["reward"] for o in scored)
    top = max(scored, key=lambda o: o["reward"])
    return {
        "pair_id": row.pair_id,
        "group": row.group,
        "prompt": row.prompt,
        "chosen": row.chosen,
        "rejected": row.rejected,
        "options": scored,
        "chosen_rank": rank,
        "ranks_chosen_first": rank == 1,
        "prefers_chosen": chosen["reward"] > rejected["reward"],
        "policy_top": top["response"],
    }


def score_samples(
    policy, reference, tokenizer, frame: pd.DataFrame, *, per_group: int, beta: float, **scoring
) -> list[dict[str, Any]]:
    """Scored options of ``per_group`` pairs of each group of ``frame`` (the evaluated split).

    ``scoring``: :func:`grpo.evaluation.pair_logps`'s options (batch_size, max_prompt_tokens,
    max_response_tokens, padding_side, device).
    """
    from grpo.evaluation import pair_logps

    pairs = pick_pairs(frame, per_group)
    if pairs.empty:
        return []
    options = option_table(pairs)
    policy_c, _, reference_c, _ = pair_logps(policy, reference, tokenizer, options, **scoring)
    return assemble(pairs, options, policy_c.tolist(), reference_c.tolist(), beta)


def sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A flat table of the samples: one row per (pair, option), for MLflow's table view (the
    prompt and, with ``evaluate.generate``, the policy's completion repeated on each row)."""
    return [
        {"pair_id": s["pair_id"], "group": s["group"], "prompt": s["prompt"], **option,
         "chosen_rank": s["chosen_rank"], "ranks_chosen_first": s["ranks_chosen_first"],
         **({"completion": s["completion"]} if "completion" in s else {})}
        for s in samples
        for option in s["options"]
    ]  # fmt: skip
