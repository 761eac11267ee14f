"""Group *Robust* Preference Optimization (Ramesh et al., NeurIPS 2024, arXiv 2405.20304).

Not to be confused with DeepSeek's Group *Relative* Policy Optimization (TRL's ``GRPOTrainer``):
this package trains a policy on preference pairs labelled with a group, minimising the loss of
the worst group (GR-DPO, GR-IPO) instead of the average, with DPO, IPO, IS-DPO and IS-IPO as
baselines.

``grpo`` holds the algorithm only: torch, transformers and the data readers. It never imports
Prefect, MLflow, DVC or Great Expectations (those live in ``tasks/`` and ``flows/``).
"""

__version__ = "0.1.0"
