"""Atomic writes: a killed run never leaves a truncated file or a half-written directory where a good one was."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def write_file_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(temp path)``, then a rename over ``path``: a killed run never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves no stray temp file (as the directory variant)


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_dir)`` and swaps the result into ``target``; the old one is removed only after."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def write_text(path: str | Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))
