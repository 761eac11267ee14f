"""One meaning of η_α at every loss scale (issue 15): the trainer divides the α step by the loss
at zero margin, keeps α off exactly 0, logs the effective number of groups and warns on collapse."""

from __future__ import annotations

import math

import pytest

from grpo.trainer import TrainConfig, train
from tests.trainer_helpers import small_pairs, tiny_model_cfg

STEPS = 6


@pytest.fixture(scope="module")
def pairs():
    return small_pairs(150, seed=0)


def run(pairs, tmp_path, **cfg):
    settings = {
        "method": "gr-ipo", "beta": 0.01, "batch_size": 8, "epochs": 0, "max_steps": STEPS,
        "eval_every": 0, "keep_best": False, "early_stop_patience": 0, "sft_epochs": 0,
        "checkpoint_every": 0, "progress": False, **cfg,
    }  # fmt: skip
    return train(pairs, tiny_model_cfg(), TrainConfig(**settings), tmp_path, resume=False)


def test_gr_ipo_at_beta_001_keeps_alpha_spread_with_the_default_eta(pairs, tmp_path, capsys):
    result = run(pairs, tmp_path)  # default η_α
    assert TrainConfig().eta_alpha == 0.05
    for record in result.history:
        weights = [v for k, v in record.items() if k.startswith("train/group_weight/")]
        assert max(weights) < 0.9  # three groups, never one-hot
        assert 1.0 < record["train/effective_groups"] <= 3.0 + 1e-9
    # at step 1 the θ update used uniform weights: exp(entropy) = K
    assert result.history[0]["train/effective_groups"] == pytest.approx(3.0)
    assert result.collapse is None
    assert "collapsed" not in capsys.readouterr().err


def test_a_large_eta_collapses_alpha_and_the_trainer_says_so(pairs, tmp_path, capsys):
    result = run(pairs, tmp_path, eta_alpha=200.0)
    info = result.collapse
    assert info is not None and 1 <= info["step"] <= STEPS
    assert info["share"] > 0.99 and info["group"] in result.groups
    assert 0 < info["suggested_eta_alpha"] < 200.0
    err = capsys.readouterr().err
    assert f"after step {info['step']}" in err and f"alpha({info['group']})" in err
    assert f"train.eta_alpha={info['suggested_eta_alpha']:g}" in err
    # collapsed or not, no weight is exactly 0 and the reported α is on the simplex
    assert min(result.final_alpha) > 0 and sum(result.final_alpha) == pytest.approx(1.0)
    # the first collapsed step's effective number of groups is close to 1 from then on
    later = [h["train/effective_groups"] for h in result.history if h["step"] > info["step"]]
    assert all(e < 1.05 for e in later)


def test_final_weights_are_those_the_last_theta_step_used(pairs, tmp_path):
    result = run(pairs, tmp_path, eta_alpha=0.5)
    last = result.history[-1]
    logged = [last[f"train/group_weight/{g}"] for g in result.groups]
    assert result.final_weights == pytest.approx(logged, abs=0)
    assert result.final_alpha == pytest.approx(logged, abs=0)  # χ = 1: w = α
    # the logged weight of step t is the one its θ update used: uniform at step 1
    first = result.history[0]
    assert [first[f"train/group_weight/{g}"] for g in result.groups] == pytest.approx(
        [1 / 3] * 3, abs=1e-15
    )


def test_dpo_effective_groups_are_those_of_the_pooled_weights(pairs, tmp_path):
    result = run(pairs, tmp_path, method="dpo", beta=0.1)
    sizes = pairs[pairs["split"] == "train"].groupby("group").size()
    share = (sizes / sizes.sum()).to_numpy()
    want = math.exp(-(share * [math.log(s) for s in share]).sum())
    for record in result.history:
        assert record["train/effective_groups"] == pytest.approx(want, rel=1e-12)


def test_effective_groups_and_the_collapse_tag_reach_mlflow(pairs, tmp_path, monkeypatch):
    """The metric streams to the run every step; the warning becomes the run's tag."""
    import mlflow

    from grpo.data import write_pairs
    from tasks import tracking
    from tasks.train import train as train_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, experiment_id = tracking.setup(tmp_path, "eta-scale")
    run_id = tracking.start_run(experiment_id)
    data = write_pairs(pairs, tmp_path / "pairs.jsonl")
    settings = {
        "method": "gr-ipo", "beta": 0.01, "eta_alpha": 200.0, "batch_size": 8, "epochs": 0,
        "max_steps": STEPS, "eval_every": 0, "keep_best": False, "early_stop_patience": 0,
        "sft_epochs": 0, "checkpoint_every": 0, "progress": False,
    }  # fmt: skip
    trained = train_stage(
        data, tiny_model_cfg(), TrainConfig(**settings), tmp_path / "train",
        log_fn=tracking.metric_logger(run_id),
    )  # fmt: skip
    evaluation = {  # a stand-in: this test is about the training record
        "metrics": {f"eval/group/{g}/reward_accuracy": 0.5 for g in trained["groups"]},
        "split": "test",
    }
    tracking.record_results(
        run_id, trained, evaluation, "reward_accuracy", logged_steps=range(1, STEPS + 1)
    )
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "train/effective_groups")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert history[0].value == pytest.approx(3.0)  # uniform α at step 1
    assert [m.value for m in history] == pytest.approx(
        [h["train/effective_groups"] for h in trained["history"]]
    )
    tag = client.get_run(run_id).data.tags["train.alpha_collapse"]
    assert tag == trained["collapse"]["message"] and "train.eta_alpha=" in tag
