"""The Great Expectations suite and ``grpo validate``: each defect found, with its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main as cli
from grpo.data.generated import GeneratedConfig, generate
from grpo.data.schema import COLUMNS, write_pairs
from tasks.validate import DataValidationError, ValidateConfig, validate

GROUPS = ["Northland", "Southland", "Island"]


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return generate(GeneratedConfig(n_pairs=300))


def cfg(tmp_path: Path, **kw) -> ValidateConfig:
    return ValidateConfig(report_dir=str(tmp_path / "reports"), **kw)


def failures_by_check(result) -> dict[tuple[str, str], dict]:
    return {(f["expectation"], str(f["column"])): f for f in result["failures"]}


def test_a_good_table_passes_and_writes_report_and_data_docs(tmp_path, small):
    path = write_pairs(small, tmp_path / "pairs.parquet")
    result = validate(path, cfg(tmp_path), GROUPS)
    assert result["success"] and result["failures"] == []
    assert result["rows"] == 300 and result["expectations"] == 27
    assert Path(result["docs_path"]).is_file()
    assert Path(result["docs_path"]).name == "index.html"
    assert any(Path(result["docs_path"]).parent.rglob("validations/**/*.html"))
    report = json.loads(Path(result["report_path"]).read_text())
    assert report["success"] is True


def test_each_defect_is_found_with_its_rows(tmp_path, small):
    bad = small.copy()
    bad.loc[3, "group"] = "Nowhere"  # not a configured group
    bad.loc[5, "chosen"] = bad.loc[5, "rejected"]  # chosen == rejected
    bad.loc[7, "prompt"] = None  # null
    bad.loc[8, "chosen"] = "   "  # blank
    dup = bad.loc[[10]].assign(pair_id="zz-duplicate")  # same group/prompt/chosen/rejected
    bad = pd.concat([bad, dup], ignore_index=True)
    # a question answered by two groups, one of its pairs moved to another split
    shared = bad.groupby("question_id").filter(
        lambda g: len(g) == 2 and g["split"].iloc[0] == "train"
    )
    leak_q = shared["question_id"].iloc[0]
    leak_rows = sorted(int(i) for i in bad.index[bad["question_id"] == leak_q])
    bad.loc[leak_rows[1], "split"] = "test"
    # Island loses its validation pairs
    bad = bad[~((bad["group"] == "Island") & (bad["split"] == "validation"))]
    bad = bad.sort_values("pair_id").reset_index(drop=True)  # the order write_pairs gives
    path = tmp_path / "bad.jsonl"
    write_pairs(bad, path)  # JSONL keeps the null prompt null
    rows = {
        name: sorted(int(i) for i in bad.index[mask])
        for name, mask in {
            "nowhere": bad["group"] == "Nowhere",
            "same": bad["chosen"] == bad["rejected"],
            "null": bad["prompt"].isna(),
            "blank": bad["chosen"] == "   ",
            "dup": bad.duplicated(["group", "prompt", "chosen", "rejected"], keep=False),
            "leak": bad["question_id"] == leak_q,
        }.items()
    }
    with pytest.raises(DataValidationError) as info:
        validate(path, cfg(tmp_path), GROUPS)
    result = info.value.result
    got = failures_by_check(result)
    assert got[("expect_column_values_to_be_in_set", "group")]["examples"] == rows["nowhere"]
    assert got[("expect_column_values_to_not_be_null", "prompt")]["examples"] == rows["null"]
    same = got[("expect_select_column_values_to_be_unique_within_record", "['chosen', 'rejected']")]
    assert same["examples"] == rows["same"] and same["failing_rows"] == 1
    assert got[("expect_column_values_to_match_regex", "chosen")]["examples"] == rows["blank"]
    dup = got[("expect_compound_columns_to_be_unique", "['group', 'prompt', 'chosen', 'rejected']")]
    assert dup["failing_rows"] == 2 and dup["examples"] == rows["dup"]
    leak = got[("expect_column_values_to_be_between", "question_splits")]
    assert leak["failing_rows"] == 2 and leak["examples"] == rows["leak"]
    counts = got[("expect_column_values_to_be_between", "pairs")]
    assert counts["table"] == "group_splits" and counts["examples"] == ["Island/validation"]
    assert len(result["failures"]) == 7
    # the message names expectation, column, count and rows
    text = str(info.value)
    assert "expect_column_values_to_be_in_set on group: 1 of" in text
    assert f"rows (0-based, file order): {rows['nowhere'][0]}" in text
    assert "'Nowhere'" in text
    assert json.loads(Path(result["report_path"]).read_text())["success"] is False  # report kept


def test_min_pairs_per_split_is_configurable(tmp_path, small):
    path = write_pairs(small, tmp_path / "pairs.parquet")
    island_val = int(((small.group == "Island") & (small.split == "validation")).sum())
    validate(path, cfg(tmp_path, min_pairs_per_split=island_val), GROUPS)
    with pytest.raises(DataValidationError, match="at least"):
        validate(path, cfg(tmp_path, min_pairs_per_split=island_val + 1, data_docs=False), GROUPS)


def test_distributional_source_checks(tmp_path, small):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "data"
    write_pairs(small, folder / "pairs.parquet")
    source = pd.DataFrame(
        {
            "question_id": ["1", "2", "3", "4"],
            "group": ["Japan"] * 4,
            "question": ["q"] * 4,
            "options": [["a", "b"], ["a", "b"], ["a", "b", "c"], ["a", "b"]],
            "shares": [[0.5, 0.5], [0.7, 0.7], [0.5, 0.5], [1.2, -0.2]],
        }
    )
    pq.write_table(
        pa.Table.from_pandas(source, preserve_index=False), folder / "pairs.source.parquet"
    )
    with pytest.raises(DataValidationError) as info:
        validate(folder / "pairs.parquet", cfg(tmp_path, data_docs=False), GROUPS)
    got = {(f["expectation"], str(f["column"])): f for f in info.value.result["failures"]}
    assert got[("expect_column_values_to_be_between", "share_sum")]["examples"] == [
        "question 2, Japan"
    ]
    assert got[("expect_column_pair_values_to_be_equal", "['n_options', 'n_shares']")][
        "examples"
    ] == ["question 3, Japan"]
    assert got[("expect_column_values_to_be_between", "share_min")]["examples"] == [
        "question 4, Japan"
    ]
    assert got[("expect_column_values_to_be_between", "share_max")]["examples"] == [
        "question 4, Japan"
    ]
    assert len(got) == 4


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("bad.jsonl", b'{"pair_id": "p1"}\n{oops\n', "line 2"),
        ("latin.csv", ",".join(COLUMNS).encode() + b"\np,q,caf\xe9,x,A,B,train\n", "not UTF-8"),
        ("empty.jsonl", b"", "empty"),
        ("cols.csv", b"pair_id,group\np1,a\n", "missing column(s)"),
    ],
)
def test_malformed_files_exit_1_with_a_message_not_a_traceback(
    tmp_path, capsys, name, content, fragment
):
    path = tmp_path / name
    path.write_bytes(content)
    code = cli(["validate", str(path), "--set", f"validate.report_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 1
    assert fragment in err and str(path) in err and "Traceback" not in err


def test_cli_exit_codes_and_json(tmp_path, capsys, small):
    good = write_pairs(small, tmp_path / "good.csv")
    summary = tmp_path / "v.json"
    report = f"validate.report_dir={tmp_path / 'r'}"
    args = [
        "validate",
        str(good),
        "--groups",
        ",".join(GROUPS),
        "--set",
        report,
        "--json",
        str(summary),
    ]
    assert cli(args) == 0
    assert json.loads(summary.read_text())["success"] is True
    assert "validation PASSED" in capsys.readouterr().out
    assert cli(["validate", str(good), "--groups", "Northland,Southland", "--set", report]) == 1
    err = capsys.readouterr().err
    assert "expect_column_values_to_be_in_set on group" in err and "'Island'" in err


def test_a_globalopinionqa_file_is_checked_directly(tmp_path):
    items = [
        {
            "question": f"Question: Q{q}?\nOptions: A. a B. b C. c\nAnswer:",
            "options": ["a", "b", "c"],
            "attribute": country,
            "gold_distribution": [0.5, 0.3, 0.2],
            "id": q,
        }
        for q in range(30)
        for country in ("Japan", "China")
    ]
    items[4]["gold_distribution"] = [0.5, 0.6, 0.2]  # sums to 1.3
    items[7]["gold_distribution"] = [0.5, 0.5]  # two shares, three options
    path = tmp_path / "opinions.json"
    path.write_text(json.dumps(items))
    with pytest.raises(DataValidationError) as info:
        validate(path, cfg(tmp_path, data_docs=False), ["Japan", "China"])
    result = info.value.result
    got = failures_by_check(result)
    assert got[("expect_column_values_to_be_between", "share_sum")]["examples"] == [
        f"{path}: item 4"
    ]
    pair = got[("expect_column_pair_values_to_be_equal", "['n_options', 'n_shares']")]
    assert pair["examples"] == [f"{path}: item 7"]
    assert len(result["failures"]) == 2
    assert result["rows"] == 59  # item 7 cannot give a pair; the other 59 do
