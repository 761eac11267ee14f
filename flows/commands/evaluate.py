"""``grpo evaluate``: per-group preference metrics of a trained policy on a pair file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Score a trained policy against its reference on a canonical pair table and print, for each
group and overall, the preference loss, the reward accuracy (β(log π − log π_ref) higher for the
chosen response), the log-prob accuracy (log π(chosen) > log π(rejected)), the mean reward margin
and the number of pairs; then the worst group for each metric and the best−worst gap.
The loss kind and β default to those the policy was trained with (policy/grpo.json).
"""

EPILOG = """\
examples:
  grpo evaluate --model outputs/train/policy --reference outputs/train/reference --data pairs.jsonl
  grpo evaluate --model outputs/train/policy --reference outputs/train/reference \\
      --data pairs.parquet --split validation --json outputs/eval.json
  grpo evaluate --model DIR --reference DIR --data pairs.csv --split all --loss ipo --beta 0.01
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="per-group loss and accuracies of a trained policy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="trained policy folder")
    parser.add_argument("--reference", required=True, type=Path, help="reference model folder")
    parser.add_argument("--data", required=True, type=Path, help="canonical pair table")
    parser.add_argument(
        "--split", default="test", help="split to evaluate, or 'all' (default: %(default)s)"
    )
    parser.add_argument(
        "--loss", help="a loss of grpo.losses.LOSS_KINDS: dpo, ipo (default: as trained)"
    )
    parser.add_argument("--beta", type=float, help="default: as trained")
    parser.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the metrics as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from grpo.data import DataFormatError, read_pairs
    from grpo.evaluation import evaluate_pairs, flatten_metrics, format_table
    from grpo.losses import LOSS_KINDS
    from grpo.modeling import load_pretrained

    try:
        if args.loss is not None and args.loss not in LOSS_KINDS:
            raise ValueError(f"--loss {args.loss!r}: one of {list(LOSS_KINDS)}")
        pairs = read_pairs(args.data)
        if args.split != "all":
            if "split" not in pairs.columns:
                raise ValueError(f"{args.data}: no 'split' column; use --split all")
            pairs = pairs[pairs["split"] == args.split].reset_index(drop=True)
            if pairs.empty:
                raise ValueError(f"{args.data}: no rows with split == {args.split!r}")
        policy, tokenizer, info = load_pretrained(args.model, args.device)
        reference, _, _ = load_pretrained(args.reference, args.device)
        result = evaluate_pairs(
            policy,
            reference,
            tokenizer,
            pairs,
            loss=args.loss or info.get("loss", "dpo"),
            beta=args.beta if args.beta is not None else float(info.get("beta", 0.1)),
            batch_size=args.batch_size,
            max_prompt_tokens=int(info.get("max_prompt_tokens", 192)),
            max_response_tokens=int(info.get("max_response_tokens", 32)),
            padding_side=info.get("padding_side", "right"),
        )
    except (DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"grpo evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.model} on {args.data} ({args.split}; {result['loss_kind']}, beta {result['beta']})"
    )
    print(format_table(result))
    if args.json:
        from grpo.io import write_json

        write_json(args.json, {**result, "metrics": flatten_metrics(result)})
    return 0
