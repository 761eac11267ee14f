"""`grpo validate FILE` checks the groups params.yaml configures, not just those in the file."""

from __future__ import annotations

import pytest

from grpo.data.generated import GeneratedConfig, generate
from grpo.data.schema import write_pairs


def cli(argv: list[str]) -> int:
    from flows.cli import main

    return main(argv)


@pytest.fixture
def two_groups(tmp_path, monkeypatch):
    """A table of Northland and Southland only (the embedded default also has Island), in a
    project folder without params.yaml."""
    monkeypatch.chdir(tmp_path)
    pairs = generate(GeneratedConfig(n_pairs=240))
    return write_pairs(pairs[pairs["group"] != "Island"], tmp_path / "pairs.jsonl")


def test_a_file_without_a_configured_group_fails(two_groups, capsys):
    quiet = ["--set", "validate.data_docs=false"]
    assert cli(["validate", str(two_groups), *quiet]) == 1
    out, err = capsys.readouterr()
    assert (
        "expected groups from the embedded defaults, data.generated.groups "
        "(data.source: generated): Northland, Southland, Island" in out
    )
    assert "'Island'" in err  # no Island pair in any split
    assert cli(["validate", str(two_groups), "--groups", "Northland,Southland", *quiet]) == 0
    assert "expected groups from --groups: Northland, Southland" in capsys.readouterr().out


def test_a_file_source_uses_data_groups_or_the_file(two_groups, tmp_path, capsys):
    (tmp_path / "params.yaml").write_text(
        f"data:\n  source: file\n  path: {two_groups}\n  groups: [Northland, Island]\n"
        "validate:\n  data_docs: false\n"
    )
    assert cli(["validate", str(two_groups)]) == 1
    assert "params.yaml, data.groups (data.source: file): Northland, Island" in (
        capsys.readouterr().out
    )
    (tmp_path / "params.yaml").write_text(
        f"data:\n  source: file\n  path: {two_groups}\nvalidate:\n  data_docs: false\n"
    )
    assert cli(["validate", str(two_groups)]) == 0
    assert "from the file itself (params.yaml sets no data.groups" in capsys.readouterr().out
