"""An MLflow dataset source for a file versioned by DVC, so a run's Datasets show the data version.

``mlflow.data`` resolves sources by URI and knows no ``dvc://`` scheme, so the pair table is
described by a source of its own: the file's path in the repository, its ``.dvc`` file, the git
revision and the DVC md5 (``dvc.api.open(path, rev=rev)`` reads it back). The dataset logged
with it is a :class:`mlflow.data.meta_dataset.MetaDataset` (metadata only: nothing is copied)
whose digest is the DVC md5.
"""

from __future__ import annotations

from typing import Any

from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import get_registered_sources, register_dataset_source

SOURCE_TYPE = "dvc"


class DVCDatasetSource(DatasetSource):
    """``path`` (relative to the repository root) at git revision ``rev``, tracked by
    ``dvc_file`` with DVC md5 ``md5``."""

    def __init__(self, path: str, rev: str | None, dvc_file: str | None, md5: str | None):
        self.path, self.rev, self.dvc_file, self.md5 = path, rev, dvc_file, md5

    @staticmethod
    def _get_source_type() -> str:
        return SOURCE_TYPE

    def load(self, dst_path: str | None = None) -> str:
        """Fetch the file at ``rev`` through DVC into ``dst_path`` (a temporary folder by
        default); returns the local file's path. Run inside the repository."""
        import shutil
        import tempfile
        from pathlib import Path

        import dvc.api

        target = Path(dst_path or tempfile.mkdtemp()) / Path(self.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        with dvc.api.open(self.path, rev=self.rev, mode="rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        return str(target)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # built explicitly, never guessed from a URI

    @classmethod
    def _resolve(cls, raw_source: Any) -> DVCDatasetSource:
        raise NotImplementedError("build DVCDatasetSource(path, rev, dvc_file, md5) directly")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rev": self.rev, "dvc_file": self.dvc_file, "md5": self.md5}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DVCDatasetSource:
        return cls(**{k: source_dict.get(k) for k in ("path", "rev", "dvc_file", "md5")})


def register() -> None:
    """Make ``mlflow.data.get_source`` rebuild this source from a logged run (idempotent)."""
    if DVCDatasetSource not in get_registered_sources():
        register_dataset_source(DVCDatasetSource)
