"""``grpo validate``: the Great Expectations suite on a pair table; exit 0 only when it passes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Validate a preference-pair table (JSONL, CSV or Parquet with the canonical columns pair_id,
question_id, group, prompt, chosen, rejected, split) with Great Expectations. A GlobalOpinionQA
file (the Hub's CSV or the distributional JSON) is checked too: its shares, and the pairs that
`grpo ingest` would build from it.

The expected groups: --groups when given; else those params.yaml (the project's, or --params;
the embedded defaults when there is none) configures for its data source, e.g.
data.generated.groups, or data.globalopinionqa.groups for a GlobalOpinionQA file; the groups
found in the file only for `data.source: file` without `data.groups`. The first line says which
list was used.

  - every column present and never null; pair_id unique
  - group in the configured set (--groups); split in train/validation/test
  - prompt, chosen, rejected non-blank and within length bounds; chosen != rejected
  - no duplicate pairs (same group, prompt, chosen, rejected)
  - every group has at least validate.min_pairs_per_split pairs in every split
  - no question_id in two splits
  - distributional sources (pairs.source.parquet beside pairs.parquet, or --source): shares in
    [0, 1], summing to 1 within validate.share_tolerance, as many shares as options

Exit 0 when every expectation passes; otherwise exit 1 and a report naming each failed
expectation, the column, the number of failing rows and example rows (0-based, file order).
A file that cannot be read (bad JSON, not UTF-8, missing columns, empty) exits 1 with the file,
line and field. Every run writes reports/validation/report.json and HTML Data Docs
(reports/validation/data_docs/index.html; validate.report_dir moves them).
"""

EPILOG = """\
examples:
  grpo validate data/pairs.parquet --groups Northland,Southland,Island
  grpo validate my_pairs.jsonl --groups a,b,c --set validate.min_pairs_per_split=10
  grpo validate data/pairs.parquet                          # groups of params.yaml's data source
  grpo validate my_pairs.csv --params other.yaml            # ... of other.yaml's
  grpo validate ../shared/data/globalopinionqa/goqa_subset.json --groups Japan,China
  xdg-open reports/validation/data_docs/index.html          # the HTML Data Docs
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a pair table with Great Expectations (exit 1 on failure)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="the pair table (.jsonl, .json, .csv, .parquet)")
    parser.add_argument(
        "--groups",
        help="comma-separated expected groups (default: those params.yaml configures for its "
        "data source)",
    )
    parser.add_argument(
        "--params",
        default=None,
        help="params file for the validate: section and the groups of the data: source "
        "(default: the project's params.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params value (repeatable), e.g. validate.min_pairs_per_split=10",
    )
    parser.add_argument("--source", help="distributional source table to check too (.parquet)")
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write a stable summary as JSON (dvc.yaml's stage output)",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.commands import prepare
    from flows.params import display_path, load_params, params_path, section
    from grpo.config import ConfigError

    root = prepare()
    try:
        file = params_path(args.params or "params.yaml", root)
        origin = display_path(file) if file.exists() else "the embedded defaults"
        params = load_params(file, args.overrides)
        cfg = section(params, "validate", display_path(file), args.overrides)
        groups, which = expected_groups(args, params, display_path(file), origin)
        print(f"grpo validate: expected groups from {which}: {', '.join(groups or ['?'])}")
        from tasks.validate import DataValidationError, format_report, validate
    except (ConfigError, ValueError) as exc:
        print(f"grpo validate: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = validate(args.file, cfg, groups, source_path=args.source)
        code = 0
        print(format_report(result))
    except DataValidationError as exc:
        result = exc.result
        code = 1
        print(format_report(result), file=sys.stderr)
    if args.json:
        from flows.stages import validation_record
        from grpo.io import write_json

        write_json(args.json, validation_record(result))
    return code


def expected_groups(
    args: argparse.Namespace, params: dict, file: str, origin: str
) -> tuple[list[str] | None, str]:
    """The groups to check and where they came from: ``--groups``; else the configured groups
    of the data source in the params (a GlobalOpinionQA file: ``data.globalopinionqa.groups``);
    else, for a ``file`` source without ``data.groups``, the groups found in the file."""
    from flows.params import section
    from grpo.data.globalopinionqa import is_opinion_file

    if args.groups:
        return [g.strip() for g in args.groups.split(",") if g.strip()], "--groups"
    data = section(params, "data", file, args.overrides)
    if is_opinion_file(Path(args.file)):
        return list(data.globalopinionqa.groups), f"{origin}, data.globalopinionqa.groups"
    groups = data.expected_groups()
    if groups is None:
        return None, f"the file itself ({origin} sets no data.groups for source {data.source})"
    key = "data.groups" if data.section() is None else f"data.{data.source}.groups"
    return list(groups), f"{origin}, {key} (data.source: {data.source})"
