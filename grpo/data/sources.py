"""The ``data`` stage's configuration and the dispatch from a source to the canonical table.

``params.yaml`` → ``data``::

    data:
      source: generated          # generated | globalopinionqa | file
      dir: data                  # the ingested folder (tracked by data.dvc)
      generated: {...}           # grpo.data.generated.GeneratedConfig
      globalopinionqa: {...}     # grpo.data.globalopinionqa.GlobalOpinionQAConfig
      path: null                 # source=file: your table (JSONL, CSV or Parquet)
      groups: null               # source=file: the expected groups (null: those in the file)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from grpo.config import from_dict
from grpo.data.generated import GeneratedConfig, generate
from grpo.data.globalopinionqa import GlobalOpinionQAConfig, build
from grpo.data.schema import read_pairs

SOURCES = ("generated", "globalopinionqa", "file")
PAIRS_FILE = "pairs.parquet"
SOURCE_FILE = "pairs.source.parquet"  # distributional sources: one row per question × group


@dataclass
class DataConfig:
    """Where the pairs come from and where the ingested table goes."""

    source: str = "generated"
    dir: str = "data"
    track: bool = True  # `dvc add` the folder (data.dvc) after writing it
    push: bool = True  # then `dvc push` it to the default DVC remote
    path: str | None = None
    groups: tuple[str, ...] | None = None
    generated: GeneratedConfig | dict = field(default_factory=GeneratedConfig)
    globalopinionqa: GlobalOpinionQAConfig | dict = field(default_factory=GlobalOpinionQAConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {list(SOURCES)}, got {self.source!r}")
        if isinstance(self.generated, dict):
            self.generated = from_dict(GeneratedConfig, self.generated, where="data.generated")
        if isinstance(self.globalopinionqa, dict):
            self.globalopinionqa = from_dict(
                GlobalOpinionQAConfig, self.globalopinionqa, where="data.globalopinionqa"
            )
        if self.source == "file" and not self.path:
            raise ValueError("path: source=file needs data.path, the file with your pairs")
        if self.groups is not None:
            self.groups = tuple(str(g) for g in self.groups)
        if not str(self.dir).strip():
            raise ValueError("dir: must name a folder, e.g. data")

    def expected_groups(self) -> tuple[str, ...] | None:
        """The configured group set (None for a file source without ``groups``)."""
        if self.source == "generated":
            return tuple(self.generated.groups)
        if self.source == "globalopinionqa":
            return tuple(self.globalopinionqa.groups)
        return self.groups


def data_config(params: dict[str, Any] | None) -> DataConfig:
    """``DataConfig`` from a whole params dict (its ``data`` section)."""
    return from_dict(DataConfig, (params or {}).get("data"), where="params.yaml:data")


def build_pairs(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, tuple[str, ...]]:
    """(pairs, source table or None, groups) for the configured source.

    The source table (question × group rows with options and shares) exists for
    distributional sources only; the validation suite checks its shares.
    """
    if cfg.source == "generated":
        pairs = generate(cfg.generated)
        return pairs, None, tuple(cfg.generated.groups)
    if cfg.source == "globalopinionqa":
        pairs, source = build(cfg.globalopinionqa)
        return pairs, source, tuple(cfg.globalopinionqa.groups)
    pairs = read_pairs(cfg.path)
    groups = cfg.groups or tuple(sorted({g for g in pairs["group"] if isinstance(g, str)}))
    return pairs, None, groups


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
