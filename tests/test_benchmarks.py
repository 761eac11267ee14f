"""The benchmark harness: timing windows, FLOP counts, same tokens and same start for every trainer.

Everything runs in-process at tiny sizes (the real benchmarks spawn one process per run).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, throughput
from benchmarks._common import LOG2, BenchSettings, default_goqa_dir, prepare_workdir, window_rates

GOQA = default_goqa_dir() / "goqa_subset.json"
needs_goqa = pytest.mark.skipif(not GOQA.exists(), reason=f"{GOQA} not present")


def test_window_rates_by_hand():
    # steps end at t = 1, 2, 3, 5, 7, 9, 11; 1 warm-up step, windows of 2 steps, 4 pairs/step:
    # window 1 = steps 1-2, from t=1 to t=3: 8 pairs / 2 s; then t=3→7 and t=7→11: 8 / 4 s.
    rates = window_rates([1, 2, 3, 5, 7, 9, 11], 0.0, warmup=1, window=2, pairs_per_step=4)
    assert rates == [4.0, 2.0, 2.0]
    # an incomplete last window is dropped
    assert window_rates([1, 2, 3, 5], 0.0, warmup=1, window=2, pairs_per_step=4) == [4.0]


def test_step_flops_by_hand():
    shape = gpu_check.Shape(
        n_layer=2, n_embd=4, n_head=1, vocab_size=10, seq_len=8, response_len=2, batch_size=3
    )
    # tokens = 2·3·8 = 48; body 6·100·48 = 28800; attention 12·2·4·8·48 = 36864;
    # head 6·10·4 = 240 per position: 12 projected positions (2·3·2) or all 48.
    f = gpu_check.step_flops(shape, n_body=100)
    assert f["tokens"] == 48
    assert f["executed"] == 28800 + 36864 + 240 * 12
    assert f["all_positions"] == 28800 + 36864 + 240 * 48


def test_peak_flops_lookup():
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert gpu_check.peak_flops("NVIDIA H200", None) == 989e12
    assert gpu_check.peak_flops("Some GPU", None) is None
    assert gpu_check.peak_flops("Some GPU", 100.0) == 100e12


def test_gpu_check_runs_every_comparison_on_cpu():
    res = gpu_check.check_against_cpu("cpu")
    assert res["ok"], [c for c in res["checks"] if not c["ok"]]
    # fast (response positions only) vs full logits, and one optimizer step, all compared
    cases = {c["case"] for c in res["checks"]}
    assert {"cpu fp32 fast", "cpu fp32 full", "cpu fp32, after one GR-DPO step"} <= cases


def test_throughput_summary_ratios_and_targets():
    def run(rates, peak, loss=LOG2):
        return {
            "window_pairs_per_s": rates,
            "window_pairs_per_cpu_s": [2 * x for x in rates],
            "peak_rss_mb": peak,
            "rss_after_imports_mb": 100.0,
            "first_step_loss": loss,
            "setup_s": 1.0,
            "reference_logps": [[-1.0, -2.0], [-3.0, -4.0]],
        }

    runs = {
        "trl": [run([10.0, 12.0, 11.0], 1000.0)],
        "dpo": [run([25.0, 23.0, 24.0], 700.0)],
        "grdpo": [run([24.0, 22.0, 23.0], 700.0)],
    }
    s = throughput.summarise(runs, BenchSettings(), {})
    assert s["trl_pairs_per_s"] == 11.0 and s["grdpo_pairs_per_s"] == 23.0
    assert s["ratios"]["grdpo_over_trl_speed"] == pytest.approx(23 / 11)
    assert s["ratios"]["grdpo_over_trl_peak_mb"] == pytest.approx(0.7)
    assert s["ratios"]["grdpo_over_dpo_time_per_pair"] == pytest.approx(24 / 23)
    assert s["grdpo_pairs_per_cpu_s"] == 46.0
    assert s["ratios"]["grdpo_over_trl_speed_cpu_time"] == pytest.approx(23 / 11)
    assert s["targets"] == {
        "grdpo_speed_ge_2x_trl": True,
        "grdpo_speed_ge_2x_trl_cpu_time": True,
        "grdpo_peak_le_0.8x_trl": True,
        "grdpo_time_per_pair_le_1.03x_dpo": False,  # 24/23 = 1.043
        "grdpo_time_per_pair_le_1.03x_dpo_cpu_time": False,
    }
    assert s["first_step_losses_agree"] and s["reference_logps_max_abs_diff"] == 0.0
    runs["dpo"][0]["first_step_loss"] = 0.7
    assert not throughput.summarise(runs, BenchSettings(), {})["first_step_losses_agree"]


@needs_goqa
def test_three_trainers_start_at_log2_on_the_same_tokens(tmp_path: Path):
    """The real harness at tiny sizes: TRL, our DPO and our GR-DPO, first step = log 2, and the
    reference log-probs each precomputed for the same GlobalOpinionQA pairs agree."""
    pytest.importorskip("trl", reason="TRL is in the `bench` extra")
    s = BenchSettings(
        n_layer=1, n_embd=32, n_head=2, vocab_size=400, max_pairs=12, batch_size=4,
        warmup_steps=1, window_steps=1, windows=1, threads=1,
    )  # fmt: skip
    facts = prepare_workdir(s, tmp_path)
    assert facts["pairs"] == 12 and facts["model_vocab"] == 400
    runs = {
        "trl": [throughput.run_trl(tmp_path, s)],
        "dpo": [throughput.run_ours(tmp_path, s, "dpo")],
        "grdpo": [throughput.run_ours(tmp_path, s, "gr-dpo")],
    }
    for name, (r,) in runs.items():
        assert r["steps"] == 2, name
        assert r["first_step_loss"] == pytest.approx(math.log(2), abs=1e-5), name
    summary = throughput.summarise(runs, s, facts)
    assert summary["reference_logps_max_abs_diff"] < 1e-4
    assert summary["first_step_losses_agree"] and summary["same_reference_logps"]
    for key in ("trl", "dpo", "grdpo"):
        assert summary[f"{key}_pairs_per_s"] > 0 and summary[f"{key}_peak_mb"] > 0
    assert {"device", "settings", "ratios", "machine"} <= set(summary)
    assert "reference_logps" not in summary["runs"]["trl"][0]  # dropped from the JSON
    assert "Opinion of people in" in (tmp_path / "pairs.jsonl").read_text()


def test_tiny_throughput_on_cpu_reports_both_methods():
    shape = gpu_check.Shape.tiny()
    shape.windows, shape.window_steps, shape.warmup_steps = 1, 1, 1
    res = gpu_check.throughput(shape, "cpu", "float32", None, deadline=float("inf"))
    for key in ("dpo", "grdpo"):
        assert res[key]["step_s"] > 0 and len(res[key]["windows_s"]) == 1
        assert res[key]["tokens_per_s"] == pytest.approx(2 * 4 * 64 / res[key]["step_s"])
    assert res["parameters"] > res["body_parameters"] > 0
    assert torch.isfinite(torch.tensor(res["grdpo_over_dpo_time_per_step"]))


def test_pipeline_split_by_stage():
    from benchmarks import pipeline

    assert pipeline.stage_name("train-600") == "train"
    assert pipeline.stage_name("log-results-92a") == "log-results"
    assert pipeline.stage_name("end-run") == "end-run"
    timings = {
        "flow_runs": [{"name": "retrain", "start": 110.0, "end": 150.0, "state": "COMPLETED"}],
        "task_runs": [
            {"name": "ingest-e78", "seconds": 2.0, "state": "COMPLETED"},
            {"name": "train-600", "seconds": 30.0, "state": "COMPLETED"},
            {"name": "evaluate-d4e", "seconds": 5.0, "state": "COMPLETED"},
            {"name": "register-2a3", "seconds": 3.0, "state": "COMPLETED"},
        ],
    }
    # launched at 100, flow 110→150, process exit at 155: wall 55 s, 30 s of it training and
    # 5 s evaluating: 25 s outside training, 20 s of orchestration/tracking/validation/DVC
    out = pipeline.analyse(55.0, 100.0, 155.0, timings, ("train",))
    assert out["training_s"] == 30.0 and out["outside_training_s"] == 25.0
    assert out["before_flow_s"] == 10.0 and out["after_flow_s"] == 5.0
    assert out["flow_outside_tasks_s"] == 40.0 - 40.0
    assert out["evaluate_s"] == 5.0 and out["overhead_s"] == 20.0
    assert out["target_overhead_le_20s"]
    out = pipeline.analyse(56.0, 100.0, 156.0, timings, ("train",))
    assert out["overhead_s"] == 21.0 and not out["target_overhead_le_20s"]
    assert [s["stage"] for s in out["stages"] if s["training"]] == ["train"]


def test_prompt_once_probe_gives_the_trainers_log_probs():
    """The probe behind the 'prompt once' proposal scores exactly what the trainer scores."""
    from benchmarks.prefix_probe import shared_prompt_logps
    from grpo.logprobs import collate_pairs, response_logps_fast

    pairs = gpu_check.random_pairs(5, 12, 3, 512, seed=4, ragged=True)
    lm = gpu_check.gpt2(gpu_check.Shape.tiny(), seed=0)
    with torch.no_grad():
        want = response_logps_fast(lm, **collate_pairs(pairs, 0).as_kwargs())
        got = shared_prompt_logps(lm, pairs.prompt, pairs.chosen, pairs.rejected, 0)
    assert torch.allclose(got, want, atol=1e-4)
