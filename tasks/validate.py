"""The validate stage: a Great Expectations suite on the canonical pair table.

``validate(path, cfg, groups)`` is what both ``dvc repro`` (through ``grpo validate``) and the
Prefect flow call. It runs GX Core (ephemeral context) on three tables and writes a JSON report
and HTML Data Docs under ``cfg.report_dir`` (default ``reports/validation/``) every time:

- ``pairs``: the table itself (one row per pair) plus one derived column, ``question_splits``
  (how many splits the row's question appears in), so cross-row checks report real rows;
- ``group_splits``: one row per (configured group, split) with its number of pairs, so a group
  missing from a split shows up as a row with 0 pairs;
- ``source`` (distributional sources only): one row per question × group with the number of
  options and of shares and the shares' min, max and sum.

A failure raises :class:`DataValidationError` carrying the same result dict (report kept).
A file that cannot be read at all (bad JSON, wrong encoding, missing columns, empty) fails the
same way, with one failure naming the file, line and field.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from grpo.data.globalopinionqa import PAPER_COUNTRIES, GlobalOpinionQAConfig, is_opinion_file
from grpo.data.globalopinionqa import build as build_opinion_pairs
from grpo.data.schema import COLUMNS, SPLITS, DataFormatError, read_pairs
from grpo.data.sources import PAIRS_FILE, SOURCE_FILE, source_stats
from grpo.io import write_json

RESPONSE_COLUMNS = ("prompt", "chosen", "rejected")


class DataValidationError(RuntimeError):
    """The data failed validation; ``.result`` holds the report (failures, report and docs paths)."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


@dataclass
class ValidateConfig:
    """Suite settings (``params.yaml`` → ``validate``)."""

    min_pairs_per_split: int = 3  # every configured group needs this many pairs in every split
    max_prompt_chars: int = 8000
    max_response_chars: int = 2000
    share_tolerance: float = 0.02  # |Σ shares − 1| allowed for distributional sources
    report_dir: str = "reports/validation"
    data_docs: bool = True
    examples: int = 5  # example rows named per failed expectation

    def __post_init__(self) -> None:
        if self.min_pairs_per_split < 0:
            raise ValueError(f"min_pairs_per_split: must be ≥ 0, got {self.min_pairs_per_split}")
        if self.max_prompt_chars < 1 or self.max_response_chars < 1:
            raise ValueError("max_prompt_chars and max_response_chars must be ≥ 1")
        if not 0 <= self.share_tolerance < 1:
            raise ValueError(f"share_tolerance: must be in [0, 1), got {self.share_tolerance}")
        if self.examples < 1:
            raise ValueError(f"examples: must be ≥ 1, got {self.examples}")


def validate(
    path: str | Path,
    cfg: ValidateConfig | dict[str, Any] | None = None,
    groups: list[str] | tuple[str, ...] | None = None,
    *,
    source_path: str | Path | None = None,
) -> dict[str, Any]:
    """Validate the pair table at ``path`` against the configured ``groups``.

    ``groups=None`` checks against the groups found in the file (the membership check then only
    guards nulls). ``source_path`` (default: ``pairs.source.parquet`` beside ``pairs.parquet``)
    adds the distributional checks. Returns ``{"success", "report_path", "docs_path",
    "failures", "groups", "rows", "expectations"}``; raises :class:`DataValidationError` when
    any expectation fails.
    """
    from grpo.config import from_dict

    if not isinstance(cfg, ValidateConfig):
        cfg = from_dict(ValidateConfig, cfg, where="validate")
    path = Path(path)
    if path.is_dir() and (path / PAIRS_FILE).is_file():  # the ingested folder, e.g. data/
        path = path / PAIRS_FILE
    report_dir = Path(cfg.report_dir)
    started = time.time()
    result = _empty_result(path, groups, report_dir)
    try:
        pairs, source_frame, groups = read_table(path, groups, result)
    except DataFormatError as exc:
        raise _unreadable(result, exc, report_dir, started) from None
    result["groups"], result["rows"] = groups, len(pairs)
    tables = checked_tables(pairs, groups, path, source_path, source_frame, result)

    outcomes = run_suites(tables, groups, cfg, report_dir / "data_docs" if cfg.data_docs else None)
    result["expectations"] = len(outcomes)
    result["failures"] = [o for o in outcomes if not o["success"]]
    result["checks"] = outcomes
    result["success"] = not result["failures"]
    if cfg.data_docs:
        result["docs_path"] = str(report_dir / "data_docs" / "index.html")
    _write_report(result, report_dir, started)
    if not result["success"]:
        raise DataValidationError(format_report(result), result)
    return result


def _empty_result(
    path: Path, groups: list[str] | tuple[str, ...] | None, report_dir: Path
) -> dict[str, Any]:
    """The result before any check ran, so an unreadable file gets a report of the same shape."""
    return {
        "success": False,
        "file": str(path),
        "report_path": str(report_dir / "report.json"),
        "docs_path": None,
        "failures": [],
        "groups": list(groups) if groups else None,
        "rows": 0,
        "expectations": 0,
    }


def _unreadable(
    result: dict[str, Any], exc: DataFormatError, report_dir: Path, started: float
) -> DataValidationError:
    """A file no suite can run on fails as one expectation naming the file, line and field."""
    result["failures"] = [
        {"table": "file", "expectation": "readable_canonical_table", "column": None,
         "failing_rows": None, "rows": None, "examples": [], "message": str(exc)}
    ]  # fmt: skip
    _write_report(result, report_dir, started)
    return DataValidationError(format_report(result), result)


def read_table(
    path: Path, groups: list[str] | tuple[str, ...] | None, result: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame | None, list[str]]:
    """(pairs, share statistics of a distributional file or None, the groups to check).

    A GlobalOpinionQA file is checked through the pairs ``grpo ingest`` would build from it
    (default: the paper's countries); ``groups=None`` takes the groups found in the table.
    Notes how the groups were found in ``result``.
    """
    source_frame = None
    if is_opinion_file(path):  # a GlobalOpinionQA file: check its shares and the pairs it gives
        opinion = GlobalOpinionQAConfig(
            path=str(path), groups=tuple(groups) if groups else PAPER_COUNTRIES
        )
        pairs, source = build_opinion_pairs(opinion)
        source_frame = source_stats(source)
        groups = list(opinion.groups)
        result["built_from_source"] = True
    else:
        pairs = read_pairs(path)
    if groups is None:
        groups = sorted({g for g in pairs["group"] if isinstance(g, str)})
        result["groups_from_file"] = True
    return pairs, source_frame, [str(g) for g in groups]


def checked_tables(
    pairs: pd.DataFrame,
    groups: list[str],
    path: Path,
    source_path: str | Path | None,
    source_frame: pd.DataFrame | None,
    result: dict[str, Any],
) -> dict[str, pd.DataFrame]:
    """The tables the suites run on: pairs, (group, split) counts and, for distributional
    sources (``pairs.source.parquet`` beside ``pairs.parquet``), the share statistics."""
    if source_path is None and path.name == PAIRS_FILE and (path.parent / SOURCE_FILE).exists():
        source_path = path.parent / SOURCE_FILE
    tables = {
        "pairs": with_derived_columns(pairs),
        "group_splits": group_split_counts(pairs, groups),
    }
    if source_path is not None:
        source_frame = source_stats(pd.read_parquet(source_path).assign(where=""))
        result["source_path"] = str(source_path)
    if source_frame is not None:
        tables["source"] = source_frame
    return tables


# --- derived tables ----------------------------------------------------------------------------


def with_derived_columns(pairs: pd.DataFrame) -> pd.DataFrame:
    """The pairs plus ``question_splits``: the number of distinct splits of the row's question."""
    out = pairs.copy()
    splits = out.groupby(out["question_id"].fillna("\x00null"))["split"].transform(
        lambda s: s.dropna().nunique()
    )
    out["question_splits"] = splits.astype(int)
    return out


def group_split_counts(pairs: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    """One row per (group, split) of the configured groups × the three splits, with ``pairs``."""
    counts = pairs.groupby(["group", "split"]).size()
    rows = [
        {"group": g, "split": s, "pairs": int(counts.get((g, s), 0))}
        for g in groups
        for s in SPLITS
    ]
    return pd.DataFrame(rows, columns=["group", "split", "pairs"])


# --- the suites ----------------------------------------------------------------------------------


def build_expectations(table: str, groups: list[str], cfg: ValidateConfig) -> list:
    """The expectations for one of the three tables (GX objects)."""
    if table == "pairs":
        return (
            _column_expectations()
            + _membership_expectations(groups)
            + _uniqueness_expectations()
            + _text_expectations(cfg)
        )
    if table == "group_splits":
        return _group_split_expectations(cfg)
    return _share_expectations(cfg)


def _column_expectations() -> list:
    """Every canonical column is present and never null: the later checks and training need them."""
    import great_expectations.expectations as gxe

    exps = []
    for col in COLUMNS:
        exps.append(gxe.ExpectColumnToExist(column=col, description=f"column {col} exists"))
        exps.append(
            gxe.ExpectColumnValuesToNotBeNull(column=col, description=f"{col} is never null")
        )
    return exps


def _membership_expectations(groups: list[str]) -> list:
    """Group and split take known values: a stray group or split would be silently ignored."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeInSet(
            column="group",
            value_set=groups,
            description="group is one of the configured groups",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="split",
            value_set=list(SPLITS),
            description="split is train, validation or test",
        ),
    ]


def _uniqueness_expectations() -> list:
    """No pair counts twice, no question sits in two splits (duplicates and leaks skew losses)."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="pair_id", description="pair_id is unique"),
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["group", "prompt", "chosen", "rejected"],
            description="no duplicate pairs (same group, prompt, chosen and rejected)",
        ),
        gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord(
            column_list=["chosen", "rejected"], description="chosen differs from rejected"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="question_splits",
            max_value=1,
            description="no question_id appears in two splits",
        ),
    ]


def _text_expectations(cfg: ValidateConfig) -> list:
    """Prompt and responses are non-blank and within the configured lengths (the model's input)."""
    import great_expectations.expectations as gxe

    exps = []
    for col in RESPONSE_COLUMNS:
        top = cfg.max_prompt_chars if col == "prompt" else cfg.max_response_chars
        exps.append(
            gxe.ExpectColumnValueLengthsToBeBetween(
                column=col,
                min_value=1,
                max_value=top,
                description=f"{col} has 1 to {top} characters",
            )
        )
        exps.append(
            gxe.ExpectColumnValuesToMatchRegex(
                column=col, regex=r"\S", description=f"{col} is not blank"
            )
        )
    return exps


def _group_split_expectations(cfg: ValidateConfig) -> list:
    """Every configured group has pairs in every split: a group's metrics need all three."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="pairs",
            min_value=cfg.min_pairs_per_split,
            description=(
                f"every configured group has at least {cfg.min_pairs_per_split} pairs in every split"
            ),
        )
    ]


def _share_expectations(cfg: ValidateConfig) -> list:
    """A distributional source's shares are a distribution over its options (pairs come from it)."""
    import great_expectations.expectations as gxe

    tol = cfg.share_tolerance
    return [
        gxe.ExpectColumnValuesToNotBeNull(
            column="share_sum", description="every share is a number"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="share_min", min_value=0.0, description="shares ≥ 0"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="share_max", max_value=1.0, description="shares ≤ 1"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="share_sum",
            min_value=1.0 - tol,
            max_value=1.0 + tol,
            description=f"shares sum to 1 ± {tol}",
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="n_options", column_B="n_shares", description="as many shares as options"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_options", min_value=2, description="at least two options"
        ),
    ]


def run_suites(
    tables: dict[str, pd.DataFrame], groups: list[str], cfg: ValidateConfig, docs_dir: Path | None
) -> list[dict[str, Any]]:
    """Run each table's suite in one ephemeral GX context; one outcome dict per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        _add_docs_site(context, docs_dir)
    source = context.data_sources.add_pandas("grpo")
    outcomes = []
    for name, frame in tables.items():
        outcomes += _run_suite(context, source, name, frame, groups, cfg)
    if docs_dir is not None:
        context.build_data_docs(site_names=["grpo"])
    return outcomes


def _add_docs_site(context, docs_dir: Path) -> None:
    """A Data Docs site in ``docs_dir``, so the HTML report lands beside report.json."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(
        site_name="grpo",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )


def _run_suite(
    context, source, name: str, frame: pd.DataFrame, groups: list[str], cfg: ValidateConfig
) -> list[dict[str, Any]]:
    """One table's suite through a checkpoint (GX records its run for the Data Docs)."""
    import great_expectations as gx

    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for exp in build_expectations(name, groups, cfg):
        suite.add_expectation(exp)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"check_{name}",
            validation_definitions=[definition],
            actions=[],  # Data Docs are built once, for all tables (run_suites)
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": cfg.examples,
            },
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame.reset_index(drop=True)})
    outcomes = []
    for validation in run.run_results.values():
        outcomes += [_outcome(name, r, frame, cfg.examples) for r in validation.results]
    return outcomes


def _outcome(table: str, r, frame: pd.DataFrame, n_examples: int) -> dict[str, Any]:
    """One GX expectation result → a plain dict the CLI and the flow can print and log."""
    kwargs = r.expectation_config.kwargs
    column = kwargs.get("column") or kwargs.get("column_list")
    if column is None and "column_A" in kwargs:
        column = [kwargs["column_A"], kwargs["column_B"]]
    res = r.result or {}
    raised = bool(r.exception_info and r.exception_info.get("raised_exception"))
    rows = [int(i) for i in (res.get("partial_unexpected_index_list") or [])][:n_examples]
    out = {
        "table": table,
        "expectation": r.expectation_config.type,
        "description": r.expectation_config.description,
        "column": column,
        "success": bool(r.success),
        "failing_rows": res.get("unexpected_count"),
        "rows": res.get("element_count", len(frame)),
        "examples": rows,
        "example_values": _plain(res.get("partial_unexpected_list") or [])[:n_examples],
    }
    if table == "group_splits" and rows:
        out["examples"] = [f"{frame.iloc[i]['group']}/{frame.iloc[i]['split']}" for i in rows]
    if table == "source" and rows:
        out["examples"] = [
            frame.iloc[i]["where"]
            or f"question {frame.iloc[i]['question_id']}, {frame.iloc[i]['group']}"
            for i in rows
        ]
    if raised:
        out["message"] = str(r.exception_info.get("exception_message"))
    return out


def _plain(values: list) -> list:
    return json.loads(json.dumps(values, default=str))


# --- reports ----------------------------------------------------------------------------------


def format_report(result: dict[str, Any]) -> str:
    """A human-readable report: one line per failed expectation with column, count and examples."""
    lines = []
    status = "PASSED" if result["success"] else "FAILED"
    lines.append(
        f"validation {status}: {result['file']} ({result['rows']} rows, "
        f"{result['expectations']} expectations, groups {result['groups']})"
    )
    for f in result["failures"]:
        if f.get("table") == "file":
            lines.append(f"  - {f['message']}")
            continue
        column = f["column"] if isinstance(f["column"], str) else ", ".join(f["column"] or [])
        count = f["failing_rows"]
        counted = f"{count} of {f['rows']} rows fail" if count is not None else "could not run"
        where = f" [{f['table']}]" if f["table"] != "pairs" else ""
        lines.append(f"  - {f['expectation']}{where} on {column}: {counted} ({f['description']})")
        if f["examples"]:
            label = "rows (0-based, file order)" if f["table"] == "pairs" else "e.g."
            lines.append(f"      {label}: {', '.join(str(e) for e in f['examples'])}")
        if f.get("example_values"):
            lines.append(f"      values: {', '.join(repr(v) for v in f['example_values'])}")
        if f.get("message"):
            lines.append(f"      error: {f['message']}")
    lines.append(f"  report: {result['report_path']}")
    if result.get("docs_path"):
        lines.append(f"  data docs: {result['docs_path']}")
    return "\n".join(lines)


def _write_report(result: dict[str, Any], report_dir: Path, started: float) -> None:
    """report.json, written atomically (kept when validation fails)."""
    result["seconds"] = round(time.time() - started, 3)
    write_json(report_dir / "report.json", result)
