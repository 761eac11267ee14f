"""The per-group table `grpo run` prints: every cell stays a separate token, however wide."""

from flows.commands.run import per_group_lines


def _row(group: str, pairs: int, loss: float) -> dict:
    accuracy = {"reward_accuracy": 0.75, "logprob_accuracy": 0.5}
    ci = {f"{m}_ci_{e}": v for m in accuracy for e, v in (("low", 0.3), ("high", 0.95))}
    return {"group": group, "pairs": pairs, "loss": loss, "reward_margin": 0.1, **accuracy, **ci}


def test_an_ipo_sized_loss_does_not_run_into_the_pair_count():
    # IPO at β = 0.01 has ℓ(0) = 2500: a 4-pair group's loss once printed as "41732.1245"
    ev = {"per_group": [_row("China", 4, 1732.1245), _row("Island", 60, 0.2651)],
          "overall": _row("overall", 64, 123456.5)}  # fmt: skip
    lines = per_group_lines(ev, 0.95)
    assert lines[1].split()[:4] == ["China", "4", "1732.1245", "0.7500"]
    assert lines[2].split()[:4] == ["Island", "60", "0.2651", "0.7500"]
    assert lines[3].split()[:3] == ["overall", "64", "123456.5000"]
    header = ["group", "pairs", "loss", "reward_accuracy", "95%", "CI", "logprob_accuracy", "95%",
              "CI", "reward_margin"]  # fmt: skip
    assert lines[0].split() == header
