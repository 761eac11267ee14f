"""The register stage: apply the worst-group gate (``grpo.gate``) to the MLflow model registry.

A rejected model gets run tags ``gate.decision=rejected`` and ``gate.reason`` and is never
registered. A passing one becomes a new version with alias ``challenger``; it also takes alias
``champion`` when there is none, or when its worst-group accuracy is at least the champion's
(plus ``champion_margin``) *on the same pairs*: the current champion is re-scored on the
challenger's evaluated pairs (``tasks.rescore``), and a paired comparison (bootstrap interval of
the worst-group difference, McNemar on the challenger's worst group) is recorded beside the point
comparison. A champion that cannot be re-scored (registered before references were logged) is
judged on its logged figure, and the tags say so. Decisions and reasons are tags on the run and
on the version. MLflow 3: aliases, not stages; aliases are read from
``get_registered_model(name).aliases``.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo.gate import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MIN_GROUP_PAIRS,
    GATE_METRICS,
    GateDecision,
    check_champion,
    check_gate,
    paired_comparison,
    worst_group_accuracy,
    worst_group_key,
)

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
    min_worst_group_accuracy: float = 0.6  # every group's lower bound must reach this
    min_group_pairs: int = DEFAULT_MIN_GROUP_PAIRS  # fewer evaluated pairs in a group: rejected
    confidence: float = DEFAULT_CONFIDENCE  # level of the Wilson intervals (0 = point estimates)
    champion_margin: float = 0.0  # champion moves iff worst group >= champion's + margin
    log_model: bool = True  # log the policy (and its reference) to MLflow (needed to register)

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
        if self.min_group_pairs < 0:
            raise ValueError(f"min_group_pairs: 0 or more, got {self.min_group_pairs}")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(
                f"confidence: in [0, 1), e.g. 0.95 (0 = point estimates), got {self.confidence}"
            )

    def gate(self, metrics: dict[str, float]) -> GateDecision:
        """:func:`grpo.gate.check_gate` with these settings."""
        return check_gate(
            metrics,
            self.min_worst_group_accuracy,
            self.metric,
            confidence=self.confidence,
            min_group_pairs=self.min_group_pairs,
        )


@dataclass
class Evidence:
    """The challenger's evaluated pairs, to re-score the champion on exactly those.

    ``per_pair``: ``{"pair_id": [...], "group": [...], "<accuracy>": [0/1, ...]}`` as
    ``tasks.evaluate`` writes it; ``pairs_path``: the table they come from (same data version).
    """

    pairs_path: str | Path
    per_pair: dict[str, list] = field(default_factory=dict)
    split: str = "test"
    model_cfg: Any = None  # device and padding side for scoring
    batch_size: int = 32
    groups: tuple[str, ...] | None = None


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


def _plain(value: float) -> float | None:
    """None for NaN (JSON has no NaN)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def gate_record(gate: GateDecision) -> dict[str, Any]:
    """The gate's decision as plain JSON values (the summary's ``gate``)."""
    return {
        "reason": gate.reason,
        "metric": gate.metric,
        "value": _plain(gate.value),
        "threshold": gate.threshold,
        "confidence": gate.confidence,
        "bound": _plain(gate.bound),
        "min_group_pairs": gate.min_group_pairs,
        "group": gate.group,
        "group_pairs": gate.pairs,
        "margin": _plain(gate.margin),
    }


def register(
    run_id: str,
    metrics: dict[str, float],
    cfg: RegisterConfig,
    *,
    model_uri: str | None,
    evidence: Evidence | None = None,
) -> dict[str, Any]:
    """Gate, then (maybe) register and move aliases. Returns the decision as a plain dict.

    Keys: ``decision`` (``rejected`` | ``registered``), :func:`gate_record`'s keys (``reason``,
    ``metric``, ``value``, ``threshold``, ``confidence``, ``bound``, ``min_group_pairs``,
    ``group``, ``group_pairs``, ``margin``), ``model_name``, ``version``, ``aliases``,
    ``champion`` (the champion version afterwards), ``champion_reason`` and
    ``champion_comparison`` (:func:`compare_with_champion`; None when nothing was registered).
    ``evidence``: the challenger's evaluated pairs, on which the champion is re-scored.
    """
    from tasks.tracking import set_tags

    gate = cfg.gate(metrics)
    out: dict[str, Any] = {
        "decision": "rejected",
        **gate_record(gate),
        "model_name": cfg.model_name,
        "version": None,
        "aliases": [],
        "champion": champion_version(cfg.model_name),
        "champion_reason": None,
        "champion_comparison": None,
    }
    if gate.passed and model_uri is None:
        gate_reason = gate.reason + "; but no model was logged (register.log_model=false)"
        out["reason"] = gate_reason
        set_tags(run_id, {"gate.decision": "rejected", "gate.reason": gate_reason})
        return out
    set_tags(run_id, {"gate.decision": gate.decision, "gate.reason": gate.reason})
    if not gate.passed:
        return out
    return _register_version(run_id, gate, cfg, model_uri, evidence, out)


def _register_version(
    run_id: str,
    gate: GateDecision,
    cfg: RegisterConfig,
    model_uri: str,
    evidence: Evidence | None,
    out: dict[str, Any],
) -> dict[str, Any]:
    """A new version with alias ``challenger`` (and ``champion`` when it is at least as good as
    the current one's worst group on the same pairs); decision tags on the version and the run."""
    import mlflow

    from tasks.tracking import set_tags

    client = _client()
    previous = champion_version(cfg.model_name)
    comparison = compare_with_champion(run_id, previous, gate.value, cfg, evidence)
    with contextlib.redirect_stderr(io.StringIO()):  # mlflow prints "Created version ..." itself
        mv = mlflow.register_model(model_uri, cfg.model_name, tags={"gate.decision": "passed"})
    version = str(mv.version)
    promote_it = comparison["promote"]
    tags = _version_tags(run_id, gate, cfg, comparison)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
    if promote_it:
        client.set_registered_model_alias(cfg.model_name, CHAMPION, version)
    set_tags(
        run_id,
        {
            "registered.model": cfg.model_name,
            "registered.version": version,
            "champion.decision": tags["champion.decision"],
            "champion.reason": comparison["reason"],
        },
    )
    out.update(
        decision="registered",
        version=version,
        aliases=aliases_of(cfg.model_name, version),
        champion=champion_version(cfg.model_name),
        champion_reason=comparison["reason"],
        champion_comparison={k: v for k, v in comparison.items() if k != "promote"},
    )
    return out


def _version_tags(
    run_id: str, gate: GateDecision, cfg: RegisterConfig, comparison: dict[str, Any]
) -> dict[str, str]:
    """The tags a registered version carries: the gate's evidence and the champion decision."""
    return {
        "gate.decision": "passed",
        "gate.reason": gate.reason,
        "gate.metric": cfg.metric,
        "gate.value": f"{gate.value:.6f}",
        "gate.bound": f"{gate.bound:.6f}",
        "gate.confidence": f"{gate.confidence:g}",
        "champion.decision": "promoted" if comparison["promote"] else "kept",
        "champion.reason": comparison["reason"],
        **comparison_tags(comparison),
        "run_id": run_id,
    }


def compare_with_champion(
    run_id: str,
    champion: str | None,
    value: float,
    cfg: RegisterConfig,
    evidence: Evidence | None,
) -> dict[str, Any]:
    """The champion rule on the same pairs (a plain dict, the summary's ``champion_comparison``).

    Keys: ``promote``, ``reason``, ``champion_version``, ``challenger_value``,
    ``champion_value``, ``reevaluated`` (True: both on the challenger's pairs; False: the
    champion's logged figure, ``note`` says why), ``evaluated_on`` ({"md5", "split", "pairs"}
    when re-evaluated) and ``paired`` (:func:`grpo.gate.paired_comparison`, or None).
    """
    base: dict[str, Any] = {
        "champion_version": champion,
        "challenger_value": value,
        "champion_value": None,
        "reevaluated": False,
        "evaluated_on": None,
        "paired": None,
        "note": None,
    }
    if champion is None:
        decision = check_champion(value, None, cfg.champion_margin)
        return {**base, "promote": True, "reason": decision.reason}
    rescored = _rescore_champion(run_id, champion, cfg, evidence)
    if rescored is None or "note" in rescored:
        logged = version_metrics(cfg.model_name, champion).get(worst_group_key(cfg.metric))
        logged = float("nan") if logged is None else float(logged)
        decision = check_champion(value, logged, cfg.champion_margin)
        note = (rescored or {}).get("note") or "no evaluated pairs to re-score the champion on"
        reason = f"{decision.reason} (champion v{champion}'s logged figure: {note})"
        return {**base, "champion_value": logged, "note": note, "promote": decision.promote,
                "reason": reason}  # fmt: skip
    decision = check_champion(rescored["challenger_value"], rescored["champion_value"],
                              cfg.champion_margin)  # fmt: skip
    where = rescored["evaluated_on"]
    reason = (
        f"{decision.reason} (champion v{champion} re-evaluated on the challenger's "
        f"{where['pairs']} {where['split']} pairs)"
    )
    return {**base, **rescored, "reevaluated": True, "promote": decision.promote, "reason": reason}


def _rescore_champion(
    run_id: str, champion: str, cfg: RegisterConfig, evidence: Evidence | None
) -> dict[str, Any] | None:
    """The champion's and the challenger's worst-group values on the challenger's pairs and
    their paired comparison; ``{"note": why}`` when the champion cannot be re-scored; None
    without evidence."""
    from tasks.evaluate import evaluated_pairs
    from tasks.rescore import NotRescorable, score_version

    if evidence is None or not evidence.per_pair.get(cfg.metric):
        return None
    frame = evaluated_pairs(evidence.pairs_path, evidence.per_pair)
    try:
        scored = score_version(
            cfg.model_name, champion, frame, model_cfg=evidence.model_cfg,
            batch_size=evidence.batch_size, confidence=cfg.confidence,
        )  # fmt: skip
    except NotRescorable as exc:
        return {"note": str(exc)}
    groups = evidence.per_pair["group"]
    challenger = [int(v) for v in evidence.per_pair[cfg.metric]]
    champion_outcomes = scored["per_pair"][cfg.metric]
    paired = paired_comparison(challenger, champion_outcomes, groups, confidence=cfg.confidence)
    md5 = _client().get_run(run_id).data.tags.get("data.md5")
    return {
        "challenger_value": worst_group_accuracy(challenger, groups)[1],
        "champion_value": worst_group_accuracy(champion_outcomes, groups)[1],
        "evaluated_on": {"md5": md5, "split": evidence.split, "pairs": len(challenger)},
        "paired": paired,
    }


def comparison_tags(comparison: dict[str, Any]) -> dict[str, str]:
    """The champion comparison as version tags (``champion.*``)."""

    def num(v: Any) -> str:
        return "nan" if v is None else f"{float(v):.6f}"

    tags = {
        "champion.previous": str(comparison["champion_version"] or "-"),
        "champion.challenger_value": num(comparison["challenger_value"]),
        "champion.champion_value": num(comparison["champion_value"]),
        "champion.reevaluated": str(bool(comparison["reevaluated"])).lower(),
    }
    if comparison.get("note"):
        tags["champion.note"] = comparison["note"][:5000]
    where, paired = comparison.get("evaluated_on"), comparison.get("paired")
    if where:
        tags["champion.evaluated_on"] = (
            f"{where['pairs']} {where['split']} pairs, data {where['md5']}"
        )
    if paired:
        tags["champion.paired"] = (
            f"worst-group difference {paired['difference']:+.4f}, {paired['confidence']:.0%} "
            f"bootstrap [{paired['low']:+.4f}, {paired['high']:+.4f}]; McNemar on "
            f"{paired['group']}: {paired['only_challenger']} vs {paired['only_champion']} "
            f"discordant, p = {paired['mcnemar_p']:.4g}"
        )
    return tags


def promote(
    name: str, version: str | int, cfg: RegisterConfig, *, force: bool = False
) -> dict[str, Any]:
    """Move ``champion`` to ``version`` by hand; the gate (with intervals, on the version's logged
    figures) is re-checked unless ``force``."""
    from tasks.tracking import describe_champion

    client = _client()
    version = str(version)
    client.get_model_version(name, version)  # raises a clear MlflowException when absent
    gate = cfg.gate(version_metrics(name, version))
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
    describe_champion(name, version, reason)
    return {
        "model_name": name,
        "version": version,
        "previous_champion": previous,
        "gate": gate.decision,
        "gate_reason": gate.reason,
        "reason": reason,
        "aliases": aliases_of(name, version),
    }
