"""The canonical table's readers and writer: round trips, deterministic bytes, clear errors."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from grpo.data.schema import COLUMNS, DataFormatError, read_pairs, write_pairs


def small_table() -> pd.DataFrame:
    rows = [
        ("p2", "q1", "b", "Opinion of people in b on: x?", "B", "A", "train"),
        ("p1", "q1", "a", "Opinion of people in a on: x?", "A", "B", "train"),
        ("p3", "q2", "a", 'Opinion of people in a on: y, "quoted"\nline two', "C", "A", "test"),
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv", ".json"])
def test_round_trip_sorted_by_pair_id(tmp_path, suffix):
    path = write_pairs(small_table(), tmp_path / f"pairs{suffix}")
    back = read_pairs(path)
    assert list(back.columns) == list(COLUMNS)
    assert list(back["pair_id"]) == ["p1", "p2", "p3"]  # sorted on write
    expected = small_table().sort_values("pair_id").reset_index(drop=True)
    assert back.equals(expected)


def test_same_pairs_give_the_same_bytes_whatever_the_row_order(tmp_path):
    table = small_table()
    a = write_pairs(table, tmp_path / "a.parquet")
    b = write_pairs(table.iloc[::-1], tmp_path / "b.parquet")
    digest = [hashlib.md5(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] == digest[1]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_pairs(small_table(), tmp_path / "pairs.parquet")
    assert list(tmp_path.iterdir()) == []


def test_numbers_become_strings_and_extra_columns_are_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    rec = dict(zip(COLUMNS, ["p1", 7, "a", "x", "A", "B", "train"], strict=True)) | {"note": "hi"}
    path.write_text(json.dumps(rec) + "\n")
    back = read_pairs(path)
    assert back.loc[0, "question_id"] == "7"
    assert list(back.columns) == [*COLUMNS, "note"]


def _expect_error(path, *fragments):
    with pytest.raises(DataFormatError) as info:
        read_pairs(path)
    message = str(info.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, message
    return message


def test_bad_json_names_the_line(tmp_path):
    good = json.dumps(dict(zip(COLUMNS, "abcdefg", strict=True)))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{{'single': 'quotes'}}\n")
    _expect_error(path, "line 4", "invalid JSON")


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    _expect_error(path, "line 1", "expected a JSON object")


def test_nested_value_names_line_and_field(tmp_path):
    rec = dict(zip(COLUMNS, "abcdefg", strict=True)) | {"chosen": ["A"]}
    path = tmp_path / "nested.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    _expect_error(path, "line 1", "'chosen'", "expected a string")


def test_wrong_encoding_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    text = ",".join(COLUMNS) + "\np1,q1,a,caf\u00e9,A,B,train\n"
    path.write_bytes(text.encode("latin-1"))
    _expect_error(path, "line 2", "not UTF-8")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    _expect_error(path, "empty")


def test_header_only_csv_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text(",".join(COLUMNS) + "\n")
    _expect_error(path, "no rows")


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("pair_id,group,prompt,chosen,rejected\np1,a,x,A,B\n")
    _expect_error(path, "missing column(s) ['question_id', 'split']")


def test_ragged_csv_row(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text(",".join(COLUMNS) + "\np1,q1,a,x,A,B,train\np2,q1,b,x,A\n")
    _expect_error(path, "data row 2", "5 fields", "header has 7")


def test_unknown_extension_and_missing_file(tmp_path):
    _expect_error(tmp_path / "pairs.txt", "unknown file type '.txt'")
    _expect_error(tmp_path / "absent.jsonl", "no such file")


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    _expect_error(path, "not a readable Parquet file")


def test_written_table_has_the_mode_a_plain_write_gives(tmp_path):
    """Atomic writes go through a private temp file; the table must not stay owner-only."""
    import os

    from grpo.data.generated import GeneratedConfig, generate

    mask = os.umask(0)
    os.umask(mask)
    for ext in ("parquet", "jsonl"):
        path = write_pairs(generate(GeneratedConfig(n_pairs=60)), tmp_path / f"pairs.{ext}")
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask
