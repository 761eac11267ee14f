"""``grpo train``: standalone SFT + preference training on a canonical pair file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.commands import add_params_arguments

DESCRIPTION = """\
Train a policy with DPO, IPO, IS-DPO, IS-IPO, GR-DPO or GR-IPO on a canonical pair table
(JSONL, CSV or Parquet with pair_id, question_id, group, prompt, chosen, rejected, split):
optional SFT on the chosen responses (the reference policy), then preference training on the
`train` split, validated on the `validation` split. Settings come from the `model:` and `train:`
sections of params.yaml, overridden with --set. Rerunning with the same --out resumes from the
newest checkpoint. Under torchrun every process trains one shard of each batch (DDP).

Writes to OUT: tokenizer/, reference/ (SFT or base model), policy/ (the trained model, loadable
with AutoModelForCausalLM.from_pretrained), checkpoints/step-*/, train_result.json.
"""

EPILOG = """\
examples:
  grpo train --data pairs.jsonl --out outputs/train
  grpo train --data pairs.parquet --set train.method=dpo --set train.epochs=1 --out outputs/dpo
  grpo train --data pairs.csv --set train.sft_epochs=1 --set train.eta_alpha=0.1 --out outputs/gr
  grpo train --data pairs.jsonl --set model.name_or_path=HuggingFaceTB/SmolLM2-135M \\
      --set model.lora=true --out outputs/smol
  torchrun --nproc_per_node 2 -m flows.cli train --data pairs.jsonl --out outputs/ddp
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="SFT + group-robust preference training on a pair file",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, type=Path, help="canonical pair table")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    add_params_arguments(parser, "train.method=gr-ipo")
    parser.add_argument(
        "--no-resume", action="store_true", help="start over even if OUT holds a checkpoint"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import load_params, section
    from grpo.config import ConfigError

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        params = load_params(args.params, args.overrides)
        from grpo.data import DataFormatError, read_pairs
        from grpo.trainer import train

        model_cfg = section(params, "model", args.params)
        train_cfg = section(params, "train", args.params)
        pairs = read_pairs(args.data)
        result = train(pairs, model_cfg, train_cfg, args.out, resume=not args.no_resume)
    except (ConfigError, DataFormatError, ValueError) as exc:
        print(f"grpo train: error: {exc}", file=sys.stderr)
        return 2
    if rank0:
        print(
            f"method      {train_cfg.method}  ({result.steps} steps"
            f"{', stopped early' if result.stopped_early else ''})"
        )
        print(f"policy      {result.model_dir}")
        print(f"reference   {result.reference_dir}")
        for g, a, w in zip(result.groups, result.alpha, result.weights, strict=True):
            print(f"  {g:<20} alpha {a:.3f}  weight {w:.3f}")
        if result.best:
            print(
                f"best val    worst-group loss {result.best['val/worst_group_loss']:.4f} "
                f"({result.best['worst_group']}), average {result.best['val/average_loss']:.4f} "
                f"at step {result.best['step']}"
            )
        if args.json:
            from grpo.io import write_json

            write_json(args.json, result.to_json())
    return 0
