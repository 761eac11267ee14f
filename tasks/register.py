"""The register stage: apply the worst-group gate (``grpo.gate``) to the MLflow model registry.

A rejected model gets run tags ``gate.decision=rejected`` and ``gate.reason`` and is never
registered. A passing one becomes a new version with alias ``challenger``; it also takes alias
``champion`` when there is none or when its worst-group accuracy is at least the champion's
(plus ``champion_margin``). Decisions and reasons are tags on the run and on the version.
MLflow 3: aliases, not stages; aliases are read from ``get_registered_model(name).aliases``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

from grpo.gate import GATE_METRICS, GateDecision, check_champion, check_gate, worst_group_key

CHAMPION = "champion"
CHALLENGER = "challenger"


class GateRejected(RuntimeError):
    """``grpo promote`` refused: the version fails the gate (use --force to override)."""


@dataclass
class RegisterConfig:
    """``params.yaml`` → ``register``: the MLflow experiment, model name and the gate."""

    experiment: str = "grpo"  # MLflow experiment of the retraining runs
    model_name: str = "grpo-policy"  # registered model name
    metric: str = "reward_accuracy"  # gate metric: reward_accuracy | logprob_accuracy
    min_worst_group_accuracy: float = 0.6  # register only if the worst group reaches this
    champion_margin: float = 0.0  # champion moves iff worst group >= champion's + margin
    log_model: bool = True  # log the policy as an MLflow model (needed to register)

    def __post_init__(self) -> None:
        if self.metric not in GATE_METRICS:
            raise ValueError(f"metric: one of {list(GATE_METRICS)}, got {self.metric!r}")
        if not self.model_name.strip() or not self.experiment.strip():
            raise ValueError("model_name and experiment must not be empty")
        if not 0.0 <= self.min_worst_group_accuracy <= 1.01:
            raise ValueError(
                f"min_worst_group_accuracy: between 0 and 1 (1.01 rejects everything), "
                f"got {self.min_worst_group_accuracy}"
            )


def _client():
    from tasks.tracking import client

    return client()


def aliases_of(name: str, version: str | int) -> list[str]:
    """The aliases pointing at ``version`` (from the registered model, not the version object)."""
    model = _client().get_registered_model(name)
    return sorted(a for a, v in (model.aliases or {}).items() if str(v) == str(version))


def champion_version(name: str) -> str | None:
    """The version holding ``champion`` (None when the model or the alias does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        model = _client().get_registered_model(name)
    except MlflowException:
        return None
    version = (model.aliases or {}).get(CHAMPION)
    return str(version) if version is not None else None


def version_metrics(name: str, version: str | int) -> dict[str, float]:
    """The metrics of the run that produced ``version``."""
    client = _client()
    mv = client.get_model_version(name, str(version))
    if not mv.run_id:
        return {}
    return dict(client.get_run(mv.run_id).data.metrics)


def register(
    run_id: str, metrics: dict[str, float], cfg: RegisterConfig, *, model_uri: str | None
) -> dict[str, Any]:
    """Gate, then (maybe) register and move aliases. Returns the decision as a plain dict.

    Keys: ``decision`` (``rejected`` | ``registered``), ``reason``, ``metric``, ``value``,
    ``threshold``, ``model_name``, ``version``, ``aliases``, ``champion`` (the champion version
    afterwards), ``champion_reason``.
    """
    from tasks.tracking import set_tags

    gate = check_gate(metrics, cfg.min_worst_group_accuracy, cfg.metric)
    out: dict[str, Any] = {
        "decision": "rejected",
        "reason": gate.reason,
        "metric": cfg.metric,
        "value": gate.value,
        "threshold": gate.threshold,
        "model_name": cfg.model_name,
        "version": None,
        "aliases": [],
        "champion": champion_version(cfg.model_name),
        "champion_reason": None,
    }
    if gate.passed and model_uri is None:
        gate_reason = gate.reason + "; but no model was logged (register.log_model=false)"
        out["reason"] = gate_reason
        set_tags(run_id, {"gate.decision": "rejected", "gate.reason": gate_reason})
        return out
    set_tags(run_id, {"gate.decision": gate.decision, "gate.reason": gate.reason})
    if not gate.passed:
        return out
    return _register_version(run_id, gate, cfg, model_uri, out)


def _register_version(
    run_id: str, gate: GateDecision, cfg: RegisterConfig, model_uri: str, out: dict[str, Any]
) -> dict[str, Any]:
    """A new version with alias ``challenger`` (and ``champion`` when it is at least as good as
    the current one's worst group); decision tags on the version and the run."""
    import mlflow

    from tasks.tracking import set_tags

    client = _client()
    previous = champion_version(cfg.model_name)
    previous_value = None
    if previous is not None:
        previous_value = version_metrics(cfg.model_name, previous).get(worst_group_key(cfg.metric))
        if previous_value is None:
            previous_value = float("nan")
    with contextlib.redirect_stderr(io.StringIO()):  # mlflow prints "Created version ..." itself
        mv = mlflow.register_model(model_uri, cfg.model_name, tags={"gate.decision": "passed"})
    version = str(mv.version)
    champ = check_champion(gate.value, previous_value, cfg.champion_margin)
    tags = {
        "gate.decision": "passed",
        "gate.reason": gate.reason,
        "gate.metric": cfg.metric,
        "gate.value": f"{gate.value:.6f}",
        "champion.decision": "promoted" if champ.promote else "kept",
        "champion.reason": champ.reason,
        "run_id": run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
    if champ.promote:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    set_tags(
        run_id,
        {
            "registered.model": cfg.model_name,
            "registered.version": version,
            "champion.decision": tags["champion.decision"],
            "champion.reason": champ.reason,
        },
    )
    out.update(
        decision="registered",
        version=version,
        aliases=aliases_of(cfg.model_name, version),
        champion=champion_version(cfg.model_name),
        champion_reason=champ.reason,
    )
    return out


def promote(
    name: str, version: str | int, cfg: RegisterConfig, *, force: bool = False
) -> dict[str, Any]:
    """Move ``champion`` to ``version`` by hand; the gate is re-checked unless ``force``."""
    client = _client()
    version = str(version)
    client.get_model_version(name, version)  # raises a clear MlflowException when absent
    gate = check_gate(version_metrics(name, version), cfg.min_worst_group_accuracy, cfg.metric)
    if not gate.passed and not force:
        raise GateRejected(
            f"{name} version {version}: {gate.reason} (use --force to promote anyway)"
        )
    previous = champion_version(name)
    reason = f"promoted by hand from version {previous}" if previous else "promoted by hand"
    if not gate.passed:
        reason += f", gate overridden with --force ({gate.reason})"
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion.decision", "promoted")
    client.set_model_version_tag(name, version, "champion.reason", reason)
    return {
        "model_name": name,
        "version": version,
        "previous_champion": previous,
        "gate": gate.decision,
        "gate_reason": gate.reason,
        "reason": reason,
        "aliases": aliases_of(name, version),
    }
