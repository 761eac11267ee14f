"""Score a registered model version on given pairs, from the MLflow registry alone.

The implicit reward β(log π − log π_ref) needs the version's policy *and* its reference: the
policy is the version's logged model, the reference the run's ``reference/`` artifacts (logged
by ``tasks.tracking.log_reference`` since the gate compares versions on the same pairs), β and
the loss kind the run's ``train.beta`` / ``train.method`` params, the truncation lengths its
``model.max_prompt_tokens`` / ``model.max_response_tokens``. A version registered before the
reference was logged cannot be re-scored: :class:`NotRescorable` says so, and callers fall back
to its logged figures, marked as such.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

REFERENCE_ARTIFACT = "reference"
POLICY_SUBDIR = "model"  # the transformers flavor's weights inside a logged model
TOKENIZER_SUBDIR = "components/tokenizer"


class NotRescorable(RuntimeError):
    """A registered version cannot be scored again (no reference artifact, no run, no β)."""


def _client():
    from tasks.tracking import client

    return client()


def version_run(name: str, version: str | int) -> Any:
    """The MLflow run that produced ``version`` (NotRescorable when it has none)."""
    mv = _client().get_model_version(name, str(version))
    if not mv.run_id:
        raise NotRescorable(f"{name} version {version} has no run")
    return _client().get_run(mv.run_id)


def has_reference(run_id: str) -> bool:
    """True when the run holds the reference model (``reference/config.json``)."""
    paths = {a.path for a in _client().list_artifacts(run_id, REFERENCE_ARTIFACT)}
    return f"{REFERENCE_ARTIFACT}/config.json" in paths


def scoring_params(name: str, version: str | int, run: Any) -> dict[str, Any]:
    """β, the loss kind and the truncation lengths of the version's training run."""
    from grpo.groups import parse_method

    params = dict(run.data.params)
    if "train.beta" not in params or "train.method" not in params:
        raise NotRescorable(f"{name} version {version}: its run has no train.beta/train.method")
    out: dict[str, Any] = {
        "beta": float(params["train.beta"]),
        "loss": parse_method(params["train.method"]).loss,
    }
    for key in ("max_prompt_tokens", "max_response_tokens"):
        if f"model.{key}" in params:
            out[key] = int(params[f"model.{key}"])
    return out


def download_version(name: str, version: str | int, dest: Path) -> tuple[Path, Path]:
    """(policy folder, reference folder) of ``version`` under ``dest``, each loadable with
    ``grpo.modeling.load_pretrained`` (the policy's tokenizer copied beside its weights)."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars on stderr

    run = version_run(name, version)
    if not has_reference(run.info.run_id):
        raise NotRescorable(
            f"{name} version {version} has no reference artifact (registered before references "
            f"were logged): it cannot be re-scored"
        )
    logged = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dest / "p"))
    )
    policy = logged / POLICY_SUBDIR
    for file in (logged / TOKENIZER_SUBDIR).glob("*"):
        shutil.copy2(file, policy / file.name)
    reference = _client().download_artifacts(run.info.run_id, REFERENCE_ARTIFACT, str(dest))
    return policy, Path(reference)


def score_version(
    name: str,
    version: str | int,
    frame: Any,
    *,
    model_cfg: Any = None,
    batch_size: int = 32,
    expected_groups: tuple[str, ...] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``grpo.evaluation.evaluate_pairs`` of ``version`` on the rows of ``frame`` (in order),
    with its own β, loss and truncation; ``model_cfg`` gives the device and padding side.

    Raises :class:`NotRescorable` when the version lacks what re-scoring needs.
    """
    from grpo.evaluation import evaluate_pairs
    from grpo.modeling import ModelConfig, load_pretrained

    model_cfg = model_cfg or ModelConfig()
    run = version_run(name, version)
    params = scoring_params(name, version, run)
    with tempfile.TemporaryDirectory(prefix="grpo-rescore-") as tmp:
        policy_dir, reference_dir = download_version(name, version, Path(tmp))
        policy, tokenizer, _ = load_pretrained(policy_dir, device=model_cfg.device)
        reference, _, _ = load_pretrained(reference_dir, device=model_cfg.device)
        return evaluate_pairs(
            policy,
            reference,
            tokenizer,
            frame,
            loss=params["loss"],
            beta=params["beta"],
            expected_groups=expected_groups,
            confidence=confidence,
            batch_size=batch_size,
            max_prompt_tokens=params.get("max_prompt_tokens", model_cfg.max_prompt_tokens),
            max_response_tokens=params.get("max_response_tokens", model_cfg.max_response_tokens),
            padding_side=model_cfg.padding_side,
            device=next(policy.parameters()).device,
        )
