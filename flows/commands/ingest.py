"""``grpo ingest``: build the canonical pair table from the configured source and version it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.commands import add_params_arguments

DESCRIPTION = """\
Build the canonical preference-pair table from the configured source (params.yaml `data:`),
write it to data/pairs.parquet, `dvc add data` (-> data.dvc) and `dvc push` it to the default
DVC remote. Prints the data version: DVC md5 of the folder and the git revision.

Sources (data.source):
  generated        the embedded group-preference dataset (default; no network needed):
                   3 groups, a 15% minority that prefers the opposite answer on most topics
  globalopinionqa  GlobalOpinionQA as in the paper: the Hub's Anthropic/llm_global_opinions
                   (data.globalopinionqa.path: null) or a local file, Hub CSV or the
                   distributional JSON of ../shared/data/globalopinionqa/
  file             your own table with the canonical columns (data.path: JSONL, CSV or Parquet)
                   pair_id, question_id, group, prompt, chosen, rejected, split

The same source and settings always give the same bytes, hence the same DVC md5: a fresh clone
re-creates exactly the data its data.dvc names.
"""

EPILOG = """\
examples:
  grpo ingest                                              # generated data, default settings
  grpo ingest --set data.generated.difficulty=0.5 --set data.generated.shares=[0.6,0.3,0.1]
  grpo ingest --set data.source=globalopinionqa            # the paper's five countries
  grpo ingest --set data.source=globalopinionqa --set data.globalopinionqa.groups=[Japan,China]
  grpo ingest --set data.source=file --set data.path=my_pairs.jsonl --set data.groups=[a,b]
  grpo ingest --no-dvc --set data.dir=/tmp/pairs           # no DVC tracking
  grpo ingest --json outputs/data/ingest.json              # the record dvc.yaml's ingest stage writes
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="build, write and DVC-version the preference pairs",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_params_arguments(parser, "data.source=globalopinionqa")
    parser.add_argument(
        "--no-dvc", action="store_true", help="write the table only (no dvc add / push)"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the data version (md5, rows, groups, counts) as JSON; no run-specific fields",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import load_params, section
    from flows.stages import ingest_record
    from grpo.config import ConfigError
    from grpo.data.schema import DataFormatError
    from grpo.io import write_json
    from tasks.ingest import DvcError, ingest

    try:
        # paths (params file, data.dir) are relative to the current folder
        cfg = section(load_params(args.params, args.overrides), "data")
        if args.no_dvc:
            cfg.track = False
        result = ingest(cfg)
    except (ConfigError, DataFormatError, DvcError, ValueError) as exc:
        print(f"grpo ingest: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if args.json:
        write_json(args.json, ingest_record(result, Path.cwd()))
    return 0


def format_summary(result: dict) -> str:
    lines = [f"ingested {result['rows']} pairs from {result['source']} -> {result['path']}"]
    for group, count in result["group_counts"].items():
        lines.append(f"  {group}: {count}")
    lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in result["split_counts"].items()))
    if result["md5"]:
        note = "unchanged" if not result["changed"] else f"changed (was {result['previous_md5']})"
        lines.append(f"  data version: DVC md5 {result['md5']} ({note}), {result['dvc_file']}")
        lines.append(f"  pushed to the DVC remote: {'yes' if result['pushed'] else 'no'}")
    else:
        lines.append(f"  not tracked by DVC; sha256 {result['sha256']}")
    lines.append(f"  git revision: {result['git_rev'] or '(not a git repository)'}")
    return "\n".join(lines)
