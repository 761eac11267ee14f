"""The fairness audit: every registered version with its per-group accuracies, from MLflow alone."""

from __future__ import annotations

import json

import pytest

from tests.test_tracking import (  # noqa: F401
    empty_db,
    fake_metrics,
    logged_run,
    store,
    tiny_model_dir,
)


def test_group_values_reads_only_the_chosen_metric():
    from tasks.audit import group_values

    metrics = {
        **fake_metrics({"b": 0.5, "a": 0.75}),
        "eval/group/a/loss": 0.6,
        "eval/group/India (x)/reward_accuracy": 0.25,
    }
    assert group_values(metrics, "reward_accuracy") == {"India (x)": 0.25, "a": 0.75, "b": 0.5}
    assert group_values(metrics, "loss") == {"a": 0.6}


def test_render_formats():
    from tasks.audit import render

    records = [
        {
            "version": "2", "created": "2026-11-27 06:00:00", "aliases": ["champion"],
            "metric": "reward_accuracy", "groups": {"a": 0.75, "b": 0.5}, "worst_group": "b",
            "worst_value": 0.5, "gap": 0.25, "overall": 0.6, "data_md5": "0123456789abcdef.dir",
            "git_rev": "deadbeefcafe", "data_source": "generated", "method": "gr-dpo",
            "gate": "passed", "run_id": "r2",
        }
    ]  # fmt: skip
    md = render(records, "markdown").splitlines()
    assert md[0] == (
        "| version | aliases | a | b | worst group | worst | gap | method | data md5 | git rev | created |"
    )
    assert md[2] == (
        "| 2 | champion | 0.750 | 0.500 | b | 0.500 | 0.250 | gr-dpo | 0123456789ab | deadbeef "
        "| 2026-11-27 06:00:00 |"
    )
    table = render(records, "table").splitlines()
    assert table[0].split() == ["version", "aliases", "a", "b", "worst", "group", "worst", "gap",
                                "method", "data", "md5", "git", "rev", "created"]  # fmt: skip
    assert json.loads(render(records, "json")) == records
    with pytest.raises(ValueError, match="format"):
        render(records, "html")


def test_audit_lists_versions_newest_first(store, tiny_model_dir, tmp_path):  # noqa: F811
    from tasks import tracking
    from tasks.audit import audit, plot, render
    from tasks.register import RegisterConfig, register

    cfg = RegisterConfig(model_name="m", min_worst_group_accuracy=0.5, confidence=0.0)
    numbers = [{"a": 0.6, "b": 0.8}, {"a": 0.9, "b": 0.7}, {"a": 0.55, "b": 0.95}]
    run_ids = []
    for i, accs in enumerate(numbers):
        run_id, uri = logged_run(store, tiny_model_dir, accs, **{"data.md5": f"md5-{i}.dir"})
        tracking.set_tags(run_id, {"data.git_rev": f"rev{i}"})
        register(run_id, fake_metrics(accs), cfg, model_uri=uri)
        run_ids.append(run_id)
    # v1 champion (0.6), v2 champion (0.7 >= 0.6), v3 challenger only (0.55 < 0.7)
    records = audit("m")
    assert [r["version"] for r in records] == ["3", "2", "1"]
    assert [r["aliases"] for r in records] == [["challenger"], ["champion"], []]
    assert [r["groups"] for r in records] == [numbers[2], numbers[1], numbers[0]]
    assert [r["worst_group"] for r in records] == ["a", "b", "a"]
    assert [r["worst_value"] for r in records] == pytest.approx([0.55, 0.7, 0.6])
    assert [r["gap"] for r in records] == pytest.approx([0.4, 0.2, 0.2])
    assert [r["data_md5"] for r in records] == ["md5-2.dir", "md5-1.dir", "md5-0.dir"]
    assert [r["git_rev"] for r in records] == ["rev2", "rev1", "rev0"]
    assert {r["method"] for r in records} == {"gr-dpo"}
    assert [r["run_id"] for r in records] == run_ids[::-1]
    # 100 pairs per group (fake_metrics); 60/100 at 95%: centre (0.6 + 0.019207)/1.038415 =
    # 0.596301, half 1.959964·√(0.0024 + 0.0000960)/1.038415 = 0.094298 → [0.502003, 0.690599]
    assert records[2]["group_pairs"] == {"a": 100, "b": 100}
    assert records[2]["groups_ci"]["a"] == pytest.approx([0.502003, 0.690599], abs=2e-6)
    # each version was trained on its own data version: only the newest compares with itself
    assert [r["same_data_as_newest"] for r in records] == [True, False, False]
    table = render(records, "table")
    assert "md5-1.dir*" in table and "md5-2.dir " in table
    assert "0.600 [0.50, 0.69]" in table and "a (n=100)" in table
    assert "* logged on another data version" in table.splitlines()[-1]
    out = plot(records, tmp_path / "audit" / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_of_a_missing_model_is_a_clear_error(store, capsys, monkeypatch, tmp_path):  # noqa: F811
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["audit", "--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("grpo audit: error: nope:") and "Traceback" not in err
