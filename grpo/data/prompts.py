"""The paper's GlobalOpinionQA prompt (arXiv 2405.20304 §5.2), shared by every source."""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_TEMPLATE = "Opinion of people in {group} on: {question}\nPlease select the best response:"
# The same question when the asker's group is not known (a group-blind prompt).
BLIND_TEMPLATE = "Question: {question}\nPlease select the best response:"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_prompt(group: str | None, question: str, options: Sequence[str]) -> str:
    """The group's identity, the question, the lettered options, then ``Answer:``.

    ``group=None`` leaves the group out (:data:`BLIND_TEMPLATE`): a policy that cannot tell who
    is asking.

    >>> print(format_prompt("Japan", "Is it sunny?", ["Yes", "No"]))
    Opinion of people in Japan on: Is it sunny?
    Please select the best response:
    A. Yes
    B. No
    Answer:

    The responses (chosen, rejected) are the bare letters (``"A"``); the trainer joins prompt and
    response.
    """
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options can be lettered, got {len(options)}")
    if group is None:
        lines = [BLIND_TEMPLATE.format(question=question)]
    else:
        lines = [PROMPT_TEMPLATE.format(group=group, question=question)]
    lines += [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]
    lines.append("Answer:")
    return "\n".join(lines)
