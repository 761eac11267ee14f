"""The paper's synthetic experiments with log-linear policies (Section 5.1, Figure 2).

``grpo reproduce synthetic`` runs them; :func:`grpo.synthetic.runner.run_sweep` is the entry point.
"""

from grpo.synthetic.env import features, make_dataset, true_rewards
from grpo.synthetic.policy import dpo_gradient, ipo_closed_form, ipo_gradient, margins
from grpo.synthetic.runner import (
    METHOD_ORDER,
    SCENARIOS,
    SweepResult,
    SyntheticConfig,
    reward_errors,
    run_sweep,
)

__all__ = [
    "METHOD_ORDER",
    "SCENARIOS",
    "SweepResult",
    "SyntheticConfig",
    "dpo_gradient",
    "features",
    "ipo_closed_form",
    "ipo_gradient",
    "make_dataset",
    "margins",
    "reward_errors",
    "run_sweep",
    "true_rewards",
]
