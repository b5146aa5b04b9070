"""The versions a run records in its ``metrics.json``: numbers are only comparable between the same releases."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "lightning", "peft", "torchmetrics")


def package_versions() -> dict[str, str | None]:
    """python and the releases of the libraries that shape the numbers (None for one that is not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
