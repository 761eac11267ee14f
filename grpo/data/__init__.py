"""Group preference data: the canonical pair table, its readers, and the sources that build it.

- :mod:`grpo.data.schema`: the canonical columns, ``read_pairs`` / ``write_pairs`` (JSONL, CSV,
  Parquet), :class:`DataFormatError`.
- :mod:`grpo.data.generated`: the embedded generated dataset (no network), the default source.
- :mod:`grpo.data.globalopinionqa`: GlobalOpinionQA as the paper uses it (Hub or distributional JSON).
- :mod:`grpo.data.splits`: question-level train/validation/test splits.
- :mod:`grpo.data.sources`: the registered sources (``SOURCES``), ``DataConfig`` (``params.yaml`` →
  ``data``) and ``build_pairs``.
"""

from grpo.data.generated import GeneratedConfig, generate
from grpo.data.globalopinionqa import GlobalOpinionQAConfig
from grpo.data.schema import COLUMNS, SPLITS, DataFormatError, read_pairs, write_pairs
from grpo.data.sources import SOURCES, DataConfig, build_pairs

__all__ = [
    "COLUMNS",
    "SOURCES",
    "SPLITS",
    "DataConfig",
    "DataFormatError",
    "GeneratedConfig",
    "GlobalOpinionQAConfig",
    "build_pairs",
    "generate",
    "read_pairs",
    "write_pairs",
]
