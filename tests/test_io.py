"""grpo.io: atomic writes leave whole files with the permissions a plain write gives."""

from __future__ import annotations

import os

import pytest

from grpo.io import atomic_open, read_json, write_json


def test_write_json_round_trip_mode_and_no_leftovers(tmp_path):
    path = write_json(tmp_path / "sub" / "m.json", {"b": 1, "a": [0.5]}, sort_keys=True)
    assert path.read_text() == '{\n  "a": [\n    0.5\n  ],\n  "b": 1\n}\n'
    assert read_json(path) == {"a": [0.5], "b": 1}
    umask = os.umask(0)
    os.umask(umask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = write_json(tmp_path / "m.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write('{"v": 2')
        raise RuntimeError("interrupted")
    assert read_json(path) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["m.json"]
    path.write_text("{bad")
    with pytest.raises(ValueError, match=r"m\.json: line 1, column 2"):
        read_json(path)
