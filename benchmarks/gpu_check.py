"""GPU check and throughput of our GR-DPO vs DPO (run by ``benchmarks/gpu.sh``).

1. **Check**: on a small batch, the device's summed response log-probs, per-pair DPO losses, the
   GR-DPO objective and one optimizer step agree with the CPU path (fp32 tight, bf16 loose).
2. **Throughput**: a GPT-2-small-shaped model (~124M parameters, built from a config: nothing is
   downloaded) at sequence length 512, bf16 autocast, reference log-probs precomputed, our
   ``PreferenceTrainer.train_step`` for DPO and GR-DPO in alternating timed windows: tokens/s,
   pairs/s, peak memory and model FLOPs utilisation.

FLOPs per optimizer step (forward + backward = 3 × forward, PaLM appendix B convention):

    6 · N_body · tokens                  (matrix products of the transformer blocks)
  + 12 · L · d · T · tokens              (attention scores and values, full T × T counted)
  + 6 · V · d · P                        (vocabulary projection at P positions)

with N_body the parameters of the blocks (embeddings excluded), L layers, width d, sequence
length T, vocabulary V. ``mfu`` counts P = the positions our trainer projects (those that predict
response tokens: it skips the rest); ``mfu_all_positions`` counts P = every token, the usual
"6·N·tokens" convention, which credits work that was not done.

``--device cpu --tiny`` runs every part on the CPU in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import gpt2_config, median
from grpo.io import write_json

EPILOG = """examples:
  benchmarks/gpu.sh outputs/bench/gpu.json                 # on a CUDA machine, < 8 minutes
  python -m benchmarks.gpu_check --json outputs/bench/gpu.json
  python -m benchmarks.gpu_check --device cpu --tiny --json /tmp/gpu-tiny.json   # ~20 s on a CPU
"""

# bf16 dense tensor-core peaks (no sparsity), FLOP/s, by a substring of the device name.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)
MFU_TARGET = 0.40


@dataclass
class Shape:
    """The benchmarked model and batch."""

    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab_size: int = 50257
    seq_len: int = 512
    response_len: int = 64
    batch_size: int = 32  # pairs per optimizer step (2 × that many sequences)
    groups: int = 5
    warmup_steps: int = 5
    window_steps: int = 20
    windows: int = 5  # per method, alternating DPO / GR-DPO

    @classmethod
    def tiny(cls) -> Shape:
        return cls(
            n_layer=2,
            n_embd=64,
            n_head=2,
            vocab_size=512,
            seq_len=64,
            response_len=8,
            batch_size=4,
            warmup_steps=1,
            window_steps=2,
            windows=2,
        )


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, value in PEAK_BF16:
        if key.lower() in name.lower():
            return value
    return None


def step_flops(shape: Shape, n_body: int) -> dict[str, float]:
    """FLOPs of one optimizer step (formula in the module docstring)."""
    tokens = 2 * shape.batch_size * shape.seq_len
    projected = 2 * shape.batch_size * shape.response_len
    body = 6.0 * n_body * tokens
    attention = 12.0 * shape.n_layer * shape.n_embd * shape.seq_len * tokens
    head = 6.0 * shape.vocab_size * shape.n_embd
    return {
        "tokens": float(tokens),
        "executed": body + attention + head * projected,
        "all_positions": body + attention + head * tokens,
    }


def gpt2(shape: Shape, seed: int):
    """The benchmarks' GPT-2 (:func:`benchmarks._common.gpt2_config`) at ``shape``; token 0 is
    BOS, EOS and padding (the pairs are random ids, no tokenizer)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    size = (shape.n_layer, shape.n_embd, shape.n_head, shape.vocab_size)
    config = dict(gpt2_config(*size, max(1024, shape.seq_len)))
    config.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(AutoConfig.for_model(**config)).float()


def body_parameters(model) -> int:
    """Parameters of the transformer blocks and final norm (token/position embeddings excluded)."""
    skip = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def random_pairs(n: int, prompt_len: int, response_len: int, vocab: int, seed: int, ragged: bool):
    """N pairs of random token ids (ids ≥ 1; 0 is padding/EOS). Ragged lengths when asked."""
    from grpo.logprobs import EncodedPairs

    g = torch.Generator().manual_seed(seed)

    def draw(length: int) -> list[int]:
        if ragged:
            length = int(torch.randint(max(1, length // 2), length + 1, (1,), generator=g))
        return torch.randint(1, vocab, (length,), generator=g).tolist()

    return EncodedPairs(
        [draw(prompt_len) for _ in range(n)],
        [draw(response_len) for _ in range(n)],
        [draw(response_len) for _ in range(n)],
    )


def make_trainer(
    model, pairs, groups, k: int, method: str, batch: int, device, dtype: str, ref, lr=1e-4
):
    from grpo.trainer import PreferenceTrainer, TrainConfig

    cfg = TrainConfig(
        method=method,
        beta=0.1,
        eta_alpha=0.05,
        lr=lr,
        batch_size=batch,
        epochs=0,
        max_steps=10**9,
        grad_clip=1.0,
        eval_batch_size=batch,
        progress=False,
    )
    return PreferenceTrainer(
        model,
        pairs,
        groups,
        [f"g{i}" for i in range(k)],
        cfg,
        pad_token_id=0,
        reference_logps=ref,
        device=device,
        dtype=dtype,
    )


def reference_logps(model, pairs, batch: int, device, dtype: str):
    from grpo.logprobs import SequenceScorer, score_pairs
    from grpo.modeling import autocast

    return score_pairs(
        SequenceScorer(model, True).eval(),
        pairs,
        pad_token_id=0,
        batch_size=batch,
        device=device,
        autocast=autocast(torch.device(device), dtype),
    )


# ----------------------------------------------------------------------------- 1. the check


def check_against_cpu(device: str) -> dict[str, Any]:
    """Device vs CPU on a small ragged batch: log-probs, losses, objective, one optimizer step."""
    from grpo.groups import mix_weights, pair_coefficients
    from grpo.logprobs import SequenceScorer, collate_pairs, split_pairs
    from grpo.losses import dpo_loss, reward_margin
    from grpo.modeling import autocast

    shape = Shape.tiny()
    n, k = 8, 3
    pairs = random_pairs(n, 24, 6, shape.vocab_size, seed=1, ragged=True)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 0, 1])
    sizes = torch.bincount(groups, minlength=k).double()
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    weights = mix_weights(alpha, 1.0)
    policy, reference = gpt2(shape, seed=0), gpt2(shape, seed=1)

    def scores(dev: str, dtype: str, fast: bool) -> dict[str, torch.Tensor]:
        d = torch.device(dev)
        batch = collate_pairs(pairs, 0).to(d)
        out = {}
        with torch.no_grad(), autocast(d, dtype):
            for name, m in (("policy", policy), ("reference", reference)):
                c, r = split_pairs(SequenceScorer(m.to(d), fast)(**batch.as_kwargs()).float())
                out[f"{name}_chosen"], out[f"{name}_rejected"] = c.cpu(), r.cpu()
        policy.cpu(), reference.cpu()
        margin = reward_margin(
            out["policy_chosen"],
            out["policy_rejected"],
            out["reference_chosen"],
            out["reference_rejected"],
        )
        out["losses"] = dpo_loss(margin, 0.1)
        coef = pair_coefficients(weights, groups, sizes, n)
        out["objective"] = (coef * out["losses"].double()).sum().reshape(1)
        return out

    def after_one_step(dev: str, dtype: str) -> torch.Tensor:
        model = gpt2(shape, seed=0)
        ref = reference_logps(reference, pairs, n, "cpu", "float32")
        # a small lr: Adam's first step is ≈ lr·sign(g), so a near-zero gradient whose sign differs
        # between devices moves that weight by up to 2·lr on one side only
        tr = make_trainer(model, pairs, groups, k, "gr-dpo", n, dev, dtype, ref, lr=1e-5)
        tr.train_step(torch.arange(n))
        with torch.no_grad():
            batch = collate_pairs(pairs, 0)
            return SequenceScorer(tr.policy.float().cpu(), True)(**batch.as_kwargs())

    cpu = scores("cpu", "float32", fast=False)  # the plain reference path: full logits
    checks: list[dict[str, Any]] = []

    def compare(label: str, got: dict[str, torch.Tensor], tol: dict[str, float]) -> None:
        for key, ref_value in cpu.items():
            atol = tol[
                "objective" if key == "objective" else "losses" if key == "losses" else "logps"
            ]
            err = float((got[key].double() - ref_value.double()).abs().max())
            checks.append({"case": label, "value": key, "max_abs_err": err, "atol": atol,
                           "ok": err <= atol})  # fmt: skip

    fp32 = {"logps": 1e-3, "losses": 1e-4, "objective": 1e-4}
    bf16 = {"logps": 0.25, "losses": 1e-2, "objective": 1e-2}  # bf16 has 8 mantissa bits
    compare(f"{device} fp32 fast", scores(device, "float32", fast=True), fp32)
    compare(f"{device} fp32 full", scores(device, "float32", fast=False), fp32)
    if torch.device(device).type == "cuda":
        compare(f"{device} bf16 fast", scores(device, "bfloat16", fast=True), bf16)
    step_cpu = after_one_step("cpu", "float32")
    step_dev = after_one_step(device, "float32")
    err = float((step_dev - step_cpu).abs().max())
    checks.append({"case": f"{device} fp32, after one GR-DPO step", "value": "logps",
                   "max_abs_err": err, "atol": 1e-3, "ok": err <= 1e-3})  # fmt: skip
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


# ----------------------------------------------------------------------------- 2. throughput


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def throughput(
    shape: Shape,
    device: str,
    dtype: str,
    peak: float | None,
    deadline: float,
    compile_decoder: bool = False,
) -> dict[str, Any]:
    """Alternating timed windows of DPO and GR-DPO steps on the same model shape and data.

    ``compile_decoder``: ``torch.compile`` the decoder body in place (the trainer calls it
    through ``get_decoder()``); the warm-up steps then include the compilation.
    """
    cuda = torch.device(device).type == "cuda"
    prompt_len = shape.seq_len - shape.response_len
    n_pairs = shape.batch_size * 4
    pairs = random_pairs(n_pairs, prompt_len, shape.response_len, shape.vocab_size, 2, False)
    groups = torch.arange(n_pairs) % shape.groups
    t0 = time.perf_counter()
    base = gpt2(shape, seed=0)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in base.parameters())
    n_body = body_parameters(base)
    t0 = time.perf_counter()
    ref = reference_logps(base.to(device), pairs, shape.batch_size, device, dtype)
    sync(device)
    reference_s = time.perf_counter() - t0
    base.cpu()
    flops = step_flops(shape, n_body)
    result: dict[str, Any] = {
        "shape": asdict(shape),
        "parameters": n_params,
        "body_parameters": n_body,
        "dtype": "bf16 autocast" if cuda and dtype != "float32" else "float32",
        "build_s": build_s,
        "reference_precompute_s": reference_s,
        "step_flops_executed": flops["executed"],
        "step_flops_all_positions": flops["all_positions"],
        "peak_flops": peak,
    }
    methods = {"dpo": "dpo", "grdpo": "gr-dpo"}
    trainers = {}
    for key, method in methods.items():
        model = gpt2(shape, seed=0)
        trainers[key] = make_trainer(
            model, pairs, groups, shape.groups, method, shape.batch_size, device, dtype, ref
        )
        if compile_decoder:
            trainers[key].policy.get_decoder().compile(dynamic=False)
    gen = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randperm(n_pairs, generator=gen)[: shape.batch_size]

    per = {k: {"windows_s": [], "peak_mb": 0.0} for k in methods}
    t0 = time.perf_counter()
    for tr in trainers.values():  # warm-up (allocator, kernels' autotuning, compilation)
        for _ in range(max(shape.warmup_steps, 2 if compile_decoder else 1)):
            tr.train_step(batch())
    sync(device)
    result["warmup_s"] = time.perf_counter() - t0
    result["compiled"] = compile_decoder
    for w in range(shape.windows):
        order = list(methods) if w % 2 == 0 else list(methods)[::-1]
        for key in order:
            if time.perf_counter() > deadline and per[key]["windows_s"]:
                continue
            tr = trainers[key]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(shape.window_steps):
                tr.train_step(batch())
            sync(device)
            per[key]["windows_s"].append(time.perf_counter() - t0)
            if cuda:
                per[key]["peak_mb"] = max(
                    per[key]["peak_mb"], torch.cuda.max_memory_allocated() / 2**20
                )
    for key in methods:
        step_s = median(per[key]["windows_s"]) / shape.window_steps
        r = {
            "step_s": step_s,
            "windows_s": per[key]["windows_s"],
            "tokens_per_s": flops["tokens"] / step_s,
            "pairs_per_s": shape.batch_size / step_s,
            "achieved_tflops": flops["executed"] / step_s / 1e12,
        }
        if cuda:
            # both trainers are resident, so this peak includes the other's weights and state
            r["peak_allocated_mb_both_resident"] = per[key]["peak_mb"]
        if peak:
            r["mfu"] = flops["executed"] / step_s / peak
            r["mfu_all_positions"] = flops["all_positions"] / step_s / peak
        result[key] = r
    result["grdpo_over_dpo_time_per_step"] = result["grdpo"]["step_s"] / result["dpo"]["step_s"]
    if peak:
        result["target_mfu_ge_0.40"] = result["grdpo"]["mfu"] >= MFU_TARGET
    del trainers
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def single_peak_memory(shape: Shape, device: str, dtype: str) -> dict[str, float]:
    """Peak allocated device memory of each method alone (a few steps), in MiB."""
    if torch.device(device).type != "cuda":
        return {}
    out = {}
    n_pairs = shape.batch_size * 2
    pairs = random_pairs(
        n_pairs, shape.seq_len - shape.response_len, shape.response_len, shape.vocab_size, 3, False
    )
    groups = torch.arange(n_pairs) % shape.groups
    ref = (torch.zeros(n_pairs), torch.zeros(n_pairs))
    for key, method in (("dpo", "dpo"), ("grdpo", "gr-dpo")):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tr = make_trainer(
            gpt2(shape, 0),
            pairs,
            groups,
            shape.groups,
            method,
            shape.batch_size,
            device,
            dtype,
            ref,
        )
        for i in range(2):
            tr.train_step(torch.arange(i * shape.batch_size, (i + 1) * shape.batch_size))
        sync(device)
        out[f"{key}_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        del tr
    gc.collect()
    torch.cuda.empty_cache()
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"device: {res['device_name']} ({res['device']}), torch {res['torch']}"]
    lines.append(
        f"check against the CPU path: {'ok' if res['check']['ok'] else 'FAILED'} "
        f"({sum(c['ok'] for c in res['check']['checks'])}/{len(res['check']['checks'])})"
    )
    for label_key, title in (("throughput", "eager"), ("throughput_compiled", "torch.compile")):
        tp = res.get(label_key)
        if not tp:
            continue
        if "error" in tp:
            lines.append(f"{title}: failed: {tp['error'][:300]}")
            continue
        lines.append(f"{title}:")
        lines += _throughput_lines(tp)
    return "\n".join(lines)


def _throughput_lines(tp: dict[str, Any]) -> list[str]:
    lines = []
    if tp:
        s = tp["shape"]
        lines.append(
            f"model: GPT-2 {s['n_layer']}×{s['n_embd']}, {tp['parameters'] / 1e6:.1f}M parameters, "
            f"seq {s['seq_len']} (response {s['response_len']}), {s['batch_size']} pairs/step, "
            f"{tp['dtype']}"
        )
        lines += ["| method | step (ms) | tokens/s | pairs/s | TFLOP/s | MFU | MFU, 6N all positions |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, label in (("dpo", "DPO"), ("grdpo", "GR-DPO")):
            r = tp[key]
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            mfu_all = f"{100 * r['mfu_all_positions']:.1f}%" if "mfu" in r else "-"
            lines.append(
                f"| {label} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{r['pairs_per_s']:.1f} | {r['achieved_tflops']:.1f} | {mfu} | {mfu_all} |"
            )
        lines.append(f"GR-DPO / DPO time per step: {tp['grdpo_over_dpo_time_per_step']:.3f}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (CPU test)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 32; tiny 4)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    p.add_argument("--response-len", type=int, help="response tokens per sequence (default 64)")
    p.add_argument("--windows", type=int, help="timed windows per method")
    p.add_argument("--window-steps", type=int, help="steps per timed window")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--peak-tflops", type=float, help="the card's bf16 dense peak, if not known")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting windows after this")
    p.add_argument(
        "--compile", action="store_true", help="also time with the decoder torch.compile'd"
    )
    p.add_argument("--skip-check", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but torch sees no GPU; use --device cpu --tiny", file=sys.stderr
        )
        return 2
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check compares exact-ish math
        torch.backends.cudnn.allow_tf32 = False
    shape = Shape.tiny() if args.tiny else Shape()
    for name, attr in (("batch_size", "batch_size"), ("seq_len", "seq_len"),
                       ("response_len", "response_len"), ("windows", "windows"),
                       ("window_steps", "window_steps")):  # fmt: skip
        value = getattr(args, attr)
        if value is not None:
            setattr(shape, name, value)
    if not 0 < shape.response_len < shape.seq_len:
        print("error: need 0 < --response-len < --seq-len", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    res: dict[str, Any] = {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    res["check"] = (
        {"ok": True, "checks": [], "skipped": True}
        if args.skip_check
        else check_against_cpu(device)
    )
    res["check_s"] = time.perf_counter() - start
    if not res["check"]["ok"]:
        print(format_table(res), file=sys.stderr)
        for c in res["check"]["checks"]:
            if not c["ok"]:
                print(f"  FAILED: {c}", file=sys.stderr)
        if args.json:
            write_json(args.json, res, sort_keys=True)
        return 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # what a user's bf16 run would have
    peak = peak_flops(name, args.peak_tflops) if cuda else None
    deadline = start + args.budget_s
    res["throughput"] = throughput(shape, device, args.dtype, peak, deadline)
    if args.compile and time.perf_counter() < deadline - 120:
        try:
            res["throughput_compiled"] = throughput(
                shape, device, args.dtype, peak, deadline, compile_decoder=True
            )
        except Exception as exc:  # report, keep the eager numbers
            res["throughput_compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if cuda and time.perf_counter() < deadline:
        res["memory_alone"] = single_peak_memory(shape, device, args.dtype)
    res["total_s"] = time.perf_counter() - start
    print(format_table(res))
    if args.json:
        write_json(args.json, res, sort_keys=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
