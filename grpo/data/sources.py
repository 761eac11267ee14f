"""The data sources, registered in one table, and the ``data`` stage's configuration.

``params.yaml`` → ``data``::

    data:
      source: generated          # a name in SOURCES
      dir: data                  # the ingested folder (tracked by data.dvc)
      generated: {...}           # each registered source's own section: its config class
      globalopinionqa: {...}
      path: null                 # source=file: your table (JSONL, CSV or Parquet)
      groups: null               # source=file: the expected groups (null: those in the file)
      splits: [0.8, 0.1, 0.1]    # source=file without a `split` column: split by question
      seed: 0

Adding a source is one module plus one line in :data:`SOURCES`: the module defines a config
dataclass (with a ``groups`` field: the groups the source yields) and a ``build(config)`` that
returns the canonical pairs, or ``(pairs, source table)`` for a distributional source whose
shares the validation suite should check. :class:`DataConfig` then has a ``data.<name>``
section for it, ``source: <name>`` selects it, and ingest, validation and the flow use it.

A ``file`` table without a ``split`` column is split by question with the rule of the built-in
sources (:func:`grpo.data.splits.split_by_question`: every group close to ``data.splits``,
seeded by ``data.seed``). The built table's ``attrs["split_rule"]`` says how its splits were made
(the ingest stage reports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import numpy as np
import pandas as pd

from grpo.config import from_dict
from grpo.data import globalopinionqa
from grpo.data.generated import GeneratedConfig, generate
from grpo.data.schema import COLUMNS, check_columns, read_table
from grpo.data.splits import check_fractions, split_by_question

PAIRS_FILE = "pairs.parquet"
SOURCE_FILE = "pairs.source.parquet"  # distributional sources: one row per question × group

Built = pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame | None]


@dataclass(frozen=True)
class Source:
    """A way to get pairs: ``config`` is the dataclass of its ``data.<name>`` section (None: the
    source is configured by ``data.path``/``data.groups``/``data.splits``/``data.seed`` and
    ``build`` gets the whole :class:`DataConfig`)."""

    config: type | None
    build: Callable[[Any], Built]


def split_rule(fractions: tuple[float, ...], seed: int) -> str:
    """``"by question, 80/10/10 (train/validation/test), seed 0"``."""
    shares = "/".join(f"{100 * f:g}" for f in fractions)
    return f"by question, {shares} (train/validation/test), seed {seed}"


def build_file(cfg: Any) -> pd.DataFrame:
    """``source: file``: :func:`read_file` of ``data.path`` with ``data.splits``/``data.seed``."""
    return read_file(cfg.path, cfg.splits, cfg.seed)


def read_file(path: str, fractions: tuple[float, ...], seed: int) -> pd.DataFrame:
    """A canonical pair table from ``path``; without a ``split`` column its questions are split
    by :func:`grpo.data.splits.split_by_question` (``fractions``, ``seed``).

    Raises ``DataFormatError`` (naming the file and the columns) when any other canonical column
    is missing; the values are the validation suite's to judge.
    """
    frame = read_table(path).reset_index(drop=True)
    if "split" in frame.columns and frame["split"].notna().any():  # JSON readers fill None
        check_columns(frame, path)
        frame.attrs["split_rule"] = f"the split column of {path}"
        return frame
    check_columns(frame, path, tuple(c for c in COLUMNS if c != "split"))
    known = frame["question_id"].notna() & frame["group"].notna()  # the suite reports the rest
    assignment = split_by_question(
        frame.loc[known, "question_id"], frame.loc[known, "group"], fractions, seed
    )
    frame["split"] = [assignment.get(q) for q in frame["question_id"]]
    frame = frame[[*COLUMNS, *(c for c in frame.columns if c not in COLUMNS)]].copy()
    frame.attrs["split_rule"] = f"{split_rule(fractions, seed)}; {path} has no split column"
    return frame


SOURCES: dict[str, Source] = {
    "generated": Source(GeneratedConfig, generate),
    "globalopinionqa": Source(globalopinionqa.GlobalOpinionQAConfig, globalopinionqa.build),
    "file": Source(None, build_file),
}


@dataclass
class _DataSettings:
    """What every source shares; :class:`DataConfig` adds one section per registered source."""

    source: str = "generated"
    dir: str = "data"
    track: bool = True  # `dvc add` the folder (data.dvc) after writing it
    push: bool = True  # then `dvc push` it to the default DVC remote
    path: str | None = None
    groups: tuple[str, ...] | None = None
    splits: tuple[float, ...] = (0.8, 0.1, 0.1)  # source=file without a split column
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {list(SOURCES)}, got {self.source!r}")
        for name, registered in SOURCES.items():
            value = getattr(self, name, None)
            if registered.config is not None and isinstance(value, dict):
                setattr(self, name, from_dict(registered.config, value, where=f"data.{name}"))
        if SOURCES[self.source].config is None and not self.path:
            raise ValueError(
                f"path: source={self.source} needs data.path, the file with your pairs"
            )
        if self.groups is not None:
            self.groups = tuple(str(g) for g in self.groups)
        self.splits = check_fractions(self.splits)
        if not str(self.dir).strip():
            raise ValueError("dir: must name a folder, e.g. data")

    def section(self) -> Any:
        """The selected source's own config (None for a source read from ``data.path``)."""
        return getattr(self, self.source) if SOURCES[self.source].config is not None else None

    def expected_groups(self) -> tuple[str, ...] | None:
        """The configured group set (None for a file source without ``groups``)."""
        section = self.section()
        return tuple(section.groups) if section is not None else self.groups


# One ``data.<name>`` field per registered source with a section, defaulting to its defaults.
DataConfig = make_dataclass(
    "DataConfig",
    [(n, s.config, field(default_factory=s.config)) for n, s in SOURCES.items() if s.config],
    bases=(_DataSettings,),
    namespace={"__module__": __name__, "__doc__": "Where the pairs come from and where they go."},
)


def build_pairs(cfg: Any) -> tuple[pd.DataFrame, pd.DataFrame | None, tuple[str, ...]]:
    """(pairs, source table or None, groups) for the configured source of ``cfg`` (a DataConfig).

    The source table (question × group rows with options and shares) exists for
    distributional sources only; the validation suite checks its shares.
    """
    registered, section = SOURCES[cfg.source], cfg.section()
    if section is None:
        pairs = registered.build(cfg)
        found = tuple(sorted({g for g in pairs["group"] if isinstance(g, str)}))
        return pairs, None, cfg.groups or found
    built = registered.build(section)
    pairs, table = built if isinstance(built, tuple) else (built, None)
    if "split_rule" not in pairs.attrs and hasattr(section, "splits"):
        pairs.attrs["split_rule"] = split_rule(section.splits, section.seed)
    return pairs, table, tuple(section.groups)


def source_stats(source: pd.DataFrame) -> pd.DataFrame:
    """Per source row: n_options, n_shares, share_min, share_max, share_sum (NaN when no shares)."""

    def stat(fn, shares):
        values = np.asarray(shares, dtype=float)
        return float(fn(values)) if values.size else float("nan")

    return pd.DataFrame(
        {
            "question_id": source["question_id"].astype(str),
            "group": source["group"].astype(str),
            "n_options": [len(o) for o in source["options"]],
            "n_shares": [len(s) for s in source["shares"]],
            "share_min": [stat(np.min, s) for s in source["shares"]],
            "share_max": [stat(np.max, s) for s in source["shares"]],
            "share_sum": [stat(np.sum, s) for s in source["shares"]],
            "where": source["where"].astype(str),
        }
    )
