"""Where trained models live: ``<models_dir>/<dataset>`` unless the user names a directory."""

from __future__ import annotations

from pathlib import Path


def dense_model_dir(models_dir: str | Path, dataset: str, model_dir: str | Path | None = None) -> Path:
    """The model train.py saves for ``dataset`` (and compress.py and evaluate.py read), or ``model_dir``."""
    return Path(model_dir) if model_dir else Path(models_dir) / dataset
