"""Models and tokenizers: any causal LM from a Hub id, a local folder, a GGUF file, or a config.

The offline default is a tiny GPT-2 built from a config (random weights, no download) with a
byte-level BPE tokenizer trained on the dataset's own texts. Both save with ``save_pretrained``
and load back with the ``Auto*`` classes, so MLflow's transformers flavor can serve them.

A ``.gguf`` file (llama.cpp's format, e.g. the SmolLM2 file that ``make models`` fetches) is
dequantised on load into a plain float32 model (:func:`load_gguf_model`) with the tokenizer
described by the file's metadata, so it trains and saves like any other model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"

# A 2-layer, 64-wide GPT-2: about 0.1M parameters besides the embeddings; trains in seconds on a CPU.
TINY_GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 64,
    "n_positions": 256,
}


@dataclass
class ModelConfig:
    """Which causal LM to train (``params.yaml`` → ``model``)."""

    # Hub id, local folder or .gguf file; empty = build from `config` (random weights)
    name_or_path: str = ""
    config: dict[str, Any] = field(default_factory=lambda: dict(TINY_GPT2))
    # Hub id, folder or .gguf file; empty = the model's own, or train a BPE when from config
    tokenizer: str = ""
    tokenizer_vocab_size: int = 512  # vocabulary of the BPE trained offline
    # longer prompts lose their middle: the first line's start (the group) and the end stay
    max_prompt_tokens: int = 192
    max_response_tokens: int = 32  # responses longer than this keep their first tokens
    padding_side: str = "right"  # "right" or "left"; log-probs do not depend on it
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "float32" | "bfloat16"
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:1" ...
    # CPU threads for torch (0 = torch's default, one per core). A tiny model is fastest on one:
    # its per-op work is too small to split, and a second thread only fights other processes.
    threads: int = 0
    lora: bool = False  # train LoRA adapters (peft) instead of all weights
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ()  # empty = peft's default for the architecture
    disable_dropout: bool = True  # dropout off (as in DPO): log-probs are deterministic
    init_seed: int = 0  # seed of the random weights when built from `config`
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.name_or_path and not self.config:
            raise ValueError(
                "model: give name_or_path (Hub id, folder or .gguf file) or a config dict"
            )
        if self.name_or_path == "" and "model_type" not in self.config:
            raise ValueError("model.config: needs a model_type (e.g. gpt2, llama)")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: 'left' or 'right', got {self.padding_side!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype: 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        if self.tokenizer_vocab_size < 300:
            raise ValueError(
                f"tokenizer_vocab_size: at least 300 (256 bytes + specials), got {self.tokenizer_vocab_size}"
            )
        if self.threads < 0:
            raise ValueError(
                f"threads: 0 (torch's default) or a positive count, got {self.threads}"
            )
        if self.lora and self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        self.lora_target_modules = tuple(self.lora_target_modules)


def use_threads(cfg: ModelConfig) -> None:
    """Set torch's intra-op CPU threads from ``cfg.threads`` (0 leaves torch's default)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, dtype: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` or ``bfloat16``); a no-op on CPU or with ``float32``."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE trained on ``texts`` (deterministic for the same texts in the same order).

    Returns a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as BOS/EOS and ``<pad>`` as PAD.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1024,
    )


def load_tokenizer(cfg: ModelConfig, texts: Iterable[str] | None = None):
    """The tokenizer of ``cfg``: from ``cfg.tokenizer`` / ``cfg.name_or_path``, or trained on ``texts``.

    A tokenizer without a pad token gets its EOS token as pad.
    """
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if source and is_gguf(source):
        tok = load_gguf_tokenizer(source)
    elif source:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    else:
        if texts is None:
            raise ValueError("a tokenizer trained offline needs the dataset's texts")
        tok = train_tokenizer(texts, cfg.tokenizer_vocab_size)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = cfg.padding_side
    return tok


def _config_from_dict(data: dict[str, Any], tokenizer) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type")
    data.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        name = key.replace("_id", "")
        data.setdefault(
            key,
            getattr(tokenizer, key, None)
            or tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)),
        )
    if data["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"model.config.vocab_size={data['vocab_size']} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    return AutoConfig.for_model(model_type, **data)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (log-probs and DDP replicas stay deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_model(cfg: ModelConfig, tokenizer, *, path: str | Path | None = None) -> nn.Module:
    """The causal LM of ``cfg`` (or the saved model at ``path``), in float32, on the CPU.

    A ``.gguf`` source is dequantised (:func:`load_gguf_model`). Built from ``cfg.config`` with
    seed ``cfg.init_seed`` when ``cfg.name_or_path`` is empty.
    LoRA adapters are *not* added here (see :func:`add_lora`), so a reference model stays plain.
    """
    from transformers import AutoModelForCausalLM

    source = str(path) if path is not None else cfg.name_or_path
    if source and is_gguf(source):
        model = load_gguf_model(source)
    elif source:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
            )
    else:
        config = _config_from_dict(cfg.config, tokenizer)
        with _seeded(cfg.init_seed):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def add_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules) or None,
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights transposed
        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2",
    )
    return get_peft_model(model, lora)


def save_model(model: nn.Module, tokenizer, out_dir: str | Path, extra: dict | None = None) -> Path:
    """``save_pretrained`` model (LoRA merged into the weights) and tokenizer into ``out_dir``.

    Written to a sibling temporary folder renamed into place, so a crash never leaves half a model.
    ``extra`` is written as ``grpo.json`` (e.g. the method and β the model was trained with).
    """
    import shutil

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = unwrap(model)
    if hasattr(plain, "merge_and_unload"):  # peft: a copy with the adapters merged
        import copy

        plain = copy.deepcopy(plain).merge_and_unload()
    with _quiet_transformers():
        plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        (tmp / "grpo.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_pretrained(path: str | Path, device: str = "auto"):
    """(model, tokenizer, extra) saved by :func:`save_model`, or of a ``.gguf`` file (extra
    ``{}``); the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    extra: dict = {}
    if is_gguf(path):
        model, tokenizer = load_gguf_model(path), load_gguf_tokenizer(path)
    elif not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no saved model here (config.json missing)")
    else:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        extra_file = path / "grpo.json"
        extra = json.loads(extra_file.read_text()) if extra_file.exists() else {}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    disable_dropout(model)
    return model.to(resolve_device(device)).eval(), tokenizer, extra


def is_gguf(source: str | Path) -> bool:
    """True when ``source`` names a GGUF file (by its ``.gguf`` suffix)."""
    return str(source).lower().endswith(".gguf")


def _gguf_location(path: str | Path) -> tuple[str, str]:
    """(folder, file name) of an existing GGUF file, as transformers' ``gguf_file=`` wants them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return str(path.parent), path.name


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer described by a GGUF file's metadata (vocabulary, merges, special tokens)."""
    from transformers import AutoTokenizer

    folder, name = _gguf_location(path)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_gguf_model(path: str | Path) -> nn.Module:
    """A GGUF file's causal LM, dequantised into a plain float32 model.

    transformers dequantises every tensor (Q4_1, Q8_0, ... → float32) and undoes llama.cpp's
    layout changes (e.g. the rotary row order of q/k), but the model it returns is marked as
    GGUF-quantised and ``save_pretrained`` refuses it. So the weights move into a model built
    from the same config without the quantisation entry: an ordinary model that trains, saves
    and reloads. Costs two copies of the weights in memory while loading.
    """
    import copy

    from transformers import AutoModelForCausalLM

    folder, name = _gguf_location(path)
    with _quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(path)
    with _seeded(
        0
    ):  # the random init is overwritten; seeded so loading never moves the caller's RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())  # strict: every weight comes from the file
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / ``torch.compile`` wrappers (a peft model stays a peft model)."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Writing model shards" progress bar (it floods CI logs); restores the caller's setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
