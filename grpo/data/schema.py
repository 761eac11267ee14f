"""The canonical pair table and its readers and writer (JSONL, CSV, Parquet).

One row per preference pair, all columns strings (``docs/architecture.md``):

    pair_id, question_id, group, prompt, chosen, rejected, split

``read_pairs`` checks the file's *structure* (readable, right encoding, parseable, the required
columns present) and raises :class:`DataFormatError` naming the file, the line or row and the
field. It does not judge the *values* (nulls, unknown groups, leaks between splits): that is the
validation suite's job (``tasks.validate``), which reports every failing row at once.

``write_pairs`` writes the table sorted by ``pair_id`` with the canonical column order, to a
temporary file renamed into place, so a given table always gives the same bytes (and therefore
the same DVC md5) and a failed write never leaves half a file behind.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd

from grpo.io import atomic_open

COLUMNS: tuple[str, ...] = (
    "pair_id",
    "question_id",
    "group",
    "prompt",
    "chosen",
    "rejected",
    "split",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class DataFormatError(ValueError):
    """A data file cannot be read as a table; the message names the file, line/row and field."""


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataFormatError(
            f"{path}: unknown file type {suffix or '(none)'!r}; expected one of {sorted(FORMATS)}"
        )
    return FORMATS[suffix]


def read_text(path: str | Path) -> str:
    """The file's text as UTF-8 (a BOM is accepted); errors name the file, line and byte."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFormatError(f"{path}: is a directory, expected a file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); re-save the file as UTF-8"
        ) from None


def _cell(value: object, where: str) -> object:
    """Scalars become strings (ids are often numbers); nested values are an error."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (dict, list)):
        raise DataFormatError(f"{where}: expected a string, got a {type(value).__name__}")
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _records_to_frame(records: list[dict], path: Path, first_line: list[int]) -> pd.DataFrame:
    columns: list[str] = list(COLUMNS)
    for rec in records:
        columns += [k for k in rec if k not in columns]
    rows = []
    for rec, line in zip(records, first_line, strict=True):
        rows.append({c: _cell(rec.get(c), f"{path}: line {line}, field {c!r}") for c in columns})
    return pd.DataFrame(rows, columns=columns, dtype=object)


def parse_json_lines(text: str, path: Path) -> tuple[list[dict], list[int]]:
    """JSONL → (records, line numbers); bad JSON or a non-object line names its line number."""
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{path}: line {number}, column {exc.colno}: invalid JSON ({exc.msg})"
            ) from None
        if not isinstance(rec, dict):
            raise DataFormatError(
                f"{path}: line {number}: expected a JSON object, got {type(rec).__name__}"
            )
        records.append(rec)
        lines.append(number)
    return records, lines


def parse_json_document(text: str, path: Path) -> list[dict]:
    """A JSON list of objects; errors name the line/column or the item number."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})"
        ) from None
    if isinstance(data, dict):
        for key in ("data", "rows", "pairs"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataFormatError(
                f"{path}: item {i}: expected a JSON object, got {type(item).__name__}"
            )
    return data


def read_table(path: str | Path) -> pd.DataFrame:
    """Any supported file → DataFrame of strings/None, columns as found (canonical ones first).

    Raises :class:`DataFormatError` for a missing, empty, undecodable or unparseable file.
    """
    path = Path(path)
    kind = _format_of(path)
    if kind == "parquet":
        if not path.is_file():
            raise DataFormatError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise DataFormatError(f"{path}: the file is empty")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
        for col in frame.columns:
            frame[col] = [
                _cell(v, f"{path}: row {i}, field {col!r}") for i, v in enumerate(frame[col])
            ]
        frame = frame.astype(object)
    else:
        text = read_text(path)
        if not text.strip():
            raise DataFormatError(f"{path}: the file is empty")
        if kind == "jsonl":
            records, lines = parse_json_lines(text, path)
            frame = _records_to_frame(records, path, lines)
        elif kind == "json":
            records = parse_json_document(text, path)
            frame = _records_to_frame(records, path, list(range(len(records))))
        else:
            frame = _read_csv(text, path)
    if frame.empty:
        raise DataFormatError(f"{path}: no rows")
    return frame


def _read_csv(text: str, path: Path) -> pd.DataFrame:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise DataFormatError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    header, body = rows[0], [r for r in rows[1:] if r]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DataFormatError(f"{path}: line 1: duplicate column name(s) {dup}")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataFormatError(
                f"{path}: data row {number - 1}: {len(row)} fields, the header has {len(header)}"
            )
    return pd.DataFrame(body, columns=header, dtype=object)


def check_columns(
    frame: pd.DataFrame, path: str | Path, required: tuple[str, ...] = COLUMNS
) -> None:
    """Raise :class:`DataFormatError` naming every required column that is missing."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataFormatError(
            f"{path}: missing column(s) {missing}; the canonical table needs {list(required)} "
            f"(found {list(frame.columns)})"
        )


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read a canonical pair table from JSONL, JSON, CSV or Parquet (chosen by the extension).

    Returns a DataFrame with the canonical columns first (strings, ``None`` for missing values),
    rows in file order, index 0..n-1. Raises :class:`DataFormatError` for a missing, empty,
    undecodable or unparseable file or missing columns; values are checked by the validation suite.
    """
    frame = read_table(path)
    check_columns(frame, path)
    return frame.reset_index(drop=True)


def canonical_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Canonical columns first, extra columns after in name order; rows sorted by ``pair_id``."""
    check_columns(frame, "table")
    extra = sorted(c for c in frame.columns if c not in COLUMNS)
    out = frame[[*COLUMNS, *extra]].copy()
    out = out.sort_values("pair_id", kind="mergesort").reset_index(drop=True)
    return out


def write_pairs(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the table atomically with deterministic bytes; the format follows the extension.

    Rows are sorted by ``pair_id`` and columns put in canonical order, so the same pairs always
    give the same file (and the same DVC md5). Returns the path written.
    """
    path = Path(path)
    kind = _format_of(path)
    table = canonical_order(frame)
    for col in table.columns:
        table[col] = table[col].astype(object).where(table[col].notna(), None)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, pa.string()) for c in table.columns])
        arrow = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
        arrow = arrow.replace_schema_metadata(None)  # no pandas/version metadata in the bytes
        with atomic_open(path, "wb") as fh:
            pq.write_table(arrow, fh, compression="zstd", write_statistics=True)
        return path
    with atomic_open(path, "w", newline="\n") as fh:
        if kind == "csv":
            table.to_csv(fh, index=False, lineterminator="\n")
        elif kind == "jsonl":
            for row in table.to_dict(orient="records"):
                fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
        else:
            json.dump(table.to_dict(orient="records"), fh, ensure_ascii=False, indent=1)
            fh.write("\n")
    return path
