"""Shared pieces of the benchmarks: settings, the GlobalOpinionQA pairs, a tiny model and
tokenizer saved once so every trainer starts from the same weights, timing and memory helpers.

The pairs, the countries, the GPT-2 and its tokenizer are the project's own (``grpo.data``,
``grpo.modeling``), so the benchmarks measure what the pipeline trains. Nothing here imports
TRL: the TRL side lives in :mod:`benchmarks.throughput` and is imported only inside the worker
that runs it, so our trainers' peak memory never includes TRL's modules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grpo.io import atomic_open

GOQA_DIR_ENV = "GRPO_GOQA_DIR"
LOG2 = math.log(2.0)


def default_goqa_dir() -> Path:
    """``$GRPO_GOQA_DIR`` or the shared offline subset beside the checkout."""
    env = os.environ.get(GOQA_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "globalopinionqa"


def paper_countries() -> tuple[str, ...]:
    """The paper's five countries: the GlobalOpinionQA source's default groups."""
    from grpo.data.globalopinionqa import GlobalOpinionQAConfig

    return tuple(GlobalOpinionQAConfig().groups)


@dataclass
class BenchSettings:
    """Everything that must be identical across the trainers of one comparison."""

    # model: GPT-2 built from a config (stack.md's shape: 4 layers x 256 dims, 4k vocabulary)
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 4096
    # data
    goqa_dir: str = field(default_factory=lambda: str(default_goqa_dir()))
    countries: tuple[str, ...] = field(default_factory=paper_countries)
    max_pairs: int = 0  # 0 = all pairs of the countries (every split)
    max_length: int = 512  # prompt + response tokens; no GlobalOpinionQA pair of ours is longer
    # training
    batch_size: int = 8
    lr: float = 1e-5
    beta: float = 0.1
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"  # transformers' name; ours builds the same torch.optim.AdamW
    eta_alpha: float = 0.01
    loss: str = "dpo"  # dpo (TRL's "sigmoid") | ipo (TRL's "ipo"); ours: dpo/gr-dpo or ipo/gr-ipo
    # a saved model folder (e.g. models/SmolLM2-135M-Instruct) instead of the GPT-2 above
    model: str = ""
    lora: bool = False  # LoRA adapters (peft's default modules) on both sides
    lora_r: int = 16
    lora_alpha: int = 32
    # timing
    warmup_steps: int = 3
    window_steps: int = 8
    windows: int = 5
    threads: int = 1  # 1: CPU time per step is then load-independent (see StepClock)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "batch_size", "window_steps", "windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.warmup_steps < 1:
            raise ValueError("warmup_steps must be >= 1 (the first step is never timed)")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.loss not in ("dpo", "ipo"):
            raise ValueError(f"loss: dpo or ipo, got {self.loss!r}")
        if self.model and not (Path(self.model) / "config.json").exists():
            raise ValueError(f"model: {self.model} holds no saved model (config.json)")
        self.countries = tuple(self.countries)

    @property
    def first_step_loss(self) -> float:
        """The loss at zero margin (policy = reference): log 2, or 1/(4β²) for IPO."""
        return LOG2 if self.loss == "dpo" else 1.0 / (4.0 * self.beta**2)

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.window_steps * self.windows

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["countries"] = list(self.countries)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchSettings:
        return cls(**data)


# ----------------------------------------------------------------------------- data


def load_goqa_pairs(settings: BenchSettings) -> list[dict[str, str]]:
    """The paper's GlobalOpinionQA pairs (prompt template, argmax chosen, seeded rejected).

    Uses the project's loader, ``grpo.data.globalopinionqa``, on the shared subset and keeps
    every split (throughput does not care which split a pair belongs to).
    Returns dicts with ``prompt``, ``chosen``, ``rejected``, ``group``, ``pair_id``.
    """
    from grpo.data import globalopinionqa as goqa

    path = Path(settings.goqa_dir) / "goqa_subset.json"
    cfg = goqa.GlobalOpinionQAConfig(
        path=str(path), groups=tuple(settings.countries), seed=settings.seed
    )
    table, _ = goqa.build(cfg)
    rows = table.sort_values("pair_id").to_dict("records")
    if settings.max_pairs:
        rows = rows[: settings.max_pairs]
    if not rows:
        raise ValueError(f"{path}: no pairs for countries {list(settings.countries)}")
    return [
        {k: str(r[k]) for k in ("pair_id", "group", "prompt", "chosen", "rejected")} for r in rows
    ]


# ----------------------------------------------------------------------------- model


def gpt2_config(
    n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int
) -> dict[str, Any]:
    """The project's tiny GPT-2 (``grpo.modeling.TINY_GPT2``) at the benchmark's size, as a
    ``model.config`` dict, with every dropout off in the saved config too (so any trainer that
    loads it, TRL included, gets policy = reference at step 0: a loss of exactly log 2)."""
    from grpo.modeling import TINY_GPT2

    return {
        **TINY_GPT2,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": n_head,
        "vocab_size": vocab_size,
        "n_positions": n_positions,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def prepare_workdir(settings: BenchSettings, workdir: str | Path) -> dict[str, Any]:
    """Write pairs.jsonl, tokenizer/ and model/ (initial weights) under ``workdir``; return facts.

    Every trainer loads the same folder, so all start from bit-identical weights and tokens.
    Responses are stored as the loader gives them (bare letters); :func:`trl_response` turns them
    into the text TRL needs to score exactly the tokens our trainer scores.
    """
    from grpo.modeling import ModelConfig, load_model, train_tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pairs = load_goqa_pairs(settings)
    if settings.model:
        return _link_saved_model(settings, workdir, pairs)
    texts = [p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in pairs]
    tokenizer = train_tokenizer(texts, settings.vocab_size)  # the pipeline's offline BPE
    lengths = check_same_tokens(tokenizer, pairs)
    if max(lengths) > settings.max_length:
        raise ValueError(
            f"the longest pair has {max(lengths)} tokens > max_length {settings.max_length}; "
            "raise --max-length so no trainer truncates"
        )
    size = (settings.n_layer, settings.n_embd, settings.n_head)
    vocab, positions = max(settings.vocab_size, len(tokenizer)), max(settings.max_length, 64)
    model_cfg = ModelConfig(config=gpt2_config(*size, vocab, positions), init_seed=settings.seed)
    model = load_model(model_cfg, tokenizer)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    _write_jsonl(workdir / "pairs.jsonl", pairs)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "pairs": len(pairs),
        "groups": sorted({p["group"] for p in pairs}),
        "tokens_per_pair_median": statistics.median(lengths),
        "tokens_per_pair_max": max(lengths),
        "tokenizer_vocab": len(tokenizer),
        "model_vocab": model.config.vocab_size,
        "parameters": n_params,
    }


def _link_saved_model(
    settings: BenchSettings, workdir: Path, pairs: list[dict[str, str]]
) -> dict[str, Any]:
    """``workdir/model`` → the saved model folder (a link: no copy of its weights); its own
    tokenizer, checked to give TRL and ours the same tokens."""
    from transformers import AutoConfig, AutoTokenizer

    source = Path(settings.model).resolve()
    tokenizer = AutoTokenizer.from_pretrained(source)
    lengths = check_same_tokens(tokenizer, pairs)
    if max(lengths) > settings.max_length:
        raise ValueError(f"the longest pair has {max(lengths)} tokens > max_length")
    link = workdir / "model"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(source, target_is_directory=True)
    _write_jsonl(workdir / "pairs.jsonl", pairs)
    config = AutoConfig.from_pretrained(source)
    return {
        "pairs": len(pairs),
        "groups": sorted({p["group"] for p in pairs}),
        "tokens_per_pair_median": statistics.median(lengths),
        "tokens_per_pair_max": max(lengths),
        "tokenizer_vocab": len(tokenizer),
        "model_vocab": config.vocab_size,
        "model": str(source),
        "model_type": config.model_type,
    }


def trl_response(prompt: str, response: str, eos_token: str) -> str:
    """The completion text that makes TRL (prompt + completion, tokenised together) score the same
    tokens as our trainer (prompt, then the response joined with a space, then EOS)."""
    from grpo.logprobs import join_response

    return join_response(prompt, response) + eos_token


def check_same_tokens(tokenizer, pairs: list[dict[str, str]]) -> list[int]:
    """Assert that TRL's tokenisation rule and ours give the same prompt and response ids.

    TRL tokenises ``prompt`` and ``prompt + completion`` and takes the completion from where they
    diverge; ours tokenises the prompt and the joined response apart and appends EOS
    (:func:`grpo.logprobs.encode_pairs`). Returns the tokens of each pair's longer sequence.
    """
    from grpo.logprobs import encode_pairs

    ours = encode_pairs(
        tokenizer,
        [p["prompt"] for p in pairs],
        [p["chosen"] for p in pairs],
        [p["rejected"] for p in pairs],
        max_prompt_tokens=10**6,
        max_response_tokens=10**6,
    )
    eos = tokenizer.eos_token
    lengths = []
    for i, p in enumerate(pairs):
        prompt_ids = tokenizer(p["prompt"])["input_ids"]
        for key, resp in (("chosen", ours.chosen[i]), ("rejected", ours.rejected[i])):
            full = tokenizer(p["prompt"] + trl_response(p["prompt"], p[key], eos))["input_ids"]
            if full[: len(prompt_ids)] != prompt_ids or full[len(prompt_ids) :] != resp:
                raise AssertionError(
                    f"pair {p['pair_id']} ({key}): TRL would score {full[len(prompt_ids) :]}, "
                    f"ours {resp}; the comparison would not be on the same tokens"
                )
        if ours.prompt[i] != prompt_ids:
            raise AssertionError(f"pair {p['pair_id']}: prompt ids differ")
        lengths.append(len(prompt_ids) + max(len(ours.chosen[i]), len(ours.rejected[i])))
    return lengths


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- timing and memory


def set_threads(n: int) -> None:
    """Same intra-op thread count for every trainer (and one inter-op thread)."""
    import torch

    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Reads ``VmHWM`` from ``/proc/self/status`` (the high-water mark of this program's own memory
    map). ``getrusage``'s ``ru_maxrss`` is not used on Linux: it survives ``exec``, so a worker
    started from a big parent would report at least the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepClock:
    """Stamps at the end of each optimizer step: wall clock (``perf_counter``) and this process's
    CPU time (``process_time``, all its threads).

    With one torch thread, CPU time per step is what the step costs on an idle core even when
    other programs share the machine (the wall clock then also counts time spent waiting for a
    core); with several threads it also counts their spin-waiting.
    """

    def __init__(self) -> None:
        self.begin()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())


def window_rates(
    stamps: list[float], start: float, warmup: int, window: int, pairs_per_step: int
) -> list[float]:
    """Pairs/s of each full window of ``window`` steps after the first ``warmup`` steps.

    ``stamps[i]`` is the end of step i; window j spans steps warmup + j·window … + window − 1,
    i.e. from the end of step warmup + j·window − 1 to the end of its last step.
    """
    ends = [start, *stamps]  # ends[i] = end of step i-1 (ends[0] = start)
    rates = []
    j = 0
    while True:
        a = warmup + j * window
        b = a + window
        if b > len(stamps):
            break
        elapsed = ends[b] - ends[a]
        rates.append(window * pairs_per_step / elapsed)
        j += 1
    return rates


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, torch version: what a reader needs to compare numbers."""
    import torch

    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        mem_gb = psutil.virtual_memory().total / 2**30
        load = os.getloadavg()
    except (ImportError, OSError):
        mem_gb, load = float("nan"), (float("nan"),) * 3
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gb, 1),
        "loadavg_1m": round(load[0], 2),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def trl_dataset(workdir: Path, eos: str):
    """The benchmark pairs as TRL's prompt/chosen/rejected dataset (responses end with EOS)."""
    from datasets import Dataset

    pairs = read_jsonl(workdir / "pairs.jsonl")
    return Dataset.from_list(
        [
            {
                "prompt": p["prompt"],
                "chosen": trl_response(p["prompt"], p["chosen"], eos),
                "rejected": trl_response(p["prompt"], p["rejected"], eos),
            }
            for p in pairs
        ]
    )


def trl_lora(s: BenchSettings):
    """TRL's peft config: the same adapters as ours (peft's default modules, r, alpha, no
    dropout); None for full fine-tuning."""
    if not s.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM")


def trl_config(s: BenchSettings, out_dir: str | Path, steps: int):
    """TRL's DPOConfig for the comparison: sigmoid loss, precomputed reference log-probs, the
    same AdamW/lr/clipping as ours, bf16 and gradient checkpointing off, no logging/eval/saving."""
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim=s.optim,
        max_grad_norm=s.max_grad_norm,
        beta=s.beta,
        loss_type=["sigmoid" if s.loss == "dpo" else "ipo"],
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=s.batch_size,
        max_length=s.max_length,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        max_steps=steps,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=s.seed,
        data_seed=s.seed,
    )
