"""Atomic writes: a killed run never leaves a truncated file or a half-written directory where a good one was.

A directory save writes ``.<name>.tmp-<pid>-<id>`` beside the target, then a marker file (:data:`MARKER`) in it
last, so a complete copy can be told from a partial one, and swaps it in: with one atomic exchange where the
kernel offers it (Linux ``renameat2(RENAME_EXCHANGE)``), else with two renames (target -> ``.old-*``, temp ->
target). Whatever instant a kill hits, :func:`recover_directory` (run by the next save and the next load of
that target) finds the old or the new directory at the target, restoring a complete ``.tmp-*`` / ``.old-*``
copy when a kill fell between the two renames, and removes the leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = ".complete"  # written last into a directory save, removed first when one is deleted


def output_path(out: str | Path, extension: str) -> Path:
    """``<out><extension>``: a benchmark's ``out`` is a name stem, which may hold dots (``ratio-0.5``), so
    ``Path.with_suffix`` would cut it."""
    out = Path(out)
    return out.with_name(out.name + extension)


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is not offered."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _leftovers(target: Path) -> list[Path]:
    """``.tmp-*`` / ``.old-*`` copies of ``target`` that no live process (other than this one) is writing."""
    found = []
    for path in target.parent.iterdir():
        for kind in ("tmp", "old"):
            prefix = f".{target.name}.{kind}-"
            if path.name.startswith(prefix) and path.is_dir():
                pid = path.name[len(prefix) :].split("-")[0]  # <pid>-<id>; earlier versions wrote <id> only
                live = "-" in path.name[len(prefix) :] and pid.isdigit() and int(pid) != os.getpid()
                if not (live and _alive(int(pid))):
                    found.append(path)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def _written_at(directory: Path) -> float:
    try:
        return float(json.loads((directory / MARKER).read_text())["written"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def remove_directory(directory: Path) -> None:
    """Marker first: a deletion that a kill interrupts never leaves a copy that looks complete."""
    if directory.is_dir():
        (directory / MARKER).unlink(missing_ok=True)
        shutil.rmtree(directory)


def recover_directory(target: str | Path) -> list[Path]:
    """Finish what a killed save left: when ``target`` is missing, the newest complete ``.tmp-*`` (the new
    directory) or ``.old-*`` (the previous one) becomes the target; every other leftover is removed. A ``.old-*``
    without the marker (a save of an earlier odllm version) is kept when there is no target and returned, so the
    caller can name it."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    leftovers = _leftovers(target)
    try:
        if not target.exists():
            complete = sorted((p for p in leftovers if is_complete(p)), key=_written_at)
            if complete:
                os.replace(complete[-1], target)
                log.warning("restored %s from %s, left by a save that was interrupted", target, complete[-1].name)
                leftovers.remove(complete[-1])
        kept = []
        for path in leftovers:
            if not target.exists() and ".old-" in path.name and not is_complete(path):
                kept.append(path)  # possibly the only copy of an older model: never deleted unseen
            else:
                remove_directory(path)
    except OSError as e:  # e.g. a read-only models directory: loading goes on, the leftovers stay
        log.warning("could not clean up after an interrupted save of %s: %s", target, e)
        return [p for p in leftovers if p.exists() and ".old-" in p.name]
    return kept


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls ``write(tmp_dir)`` and swaps the result into ``target``; a kill at any instant leaves the old or the
    new directory there (or, between two renames, a complete copy that the next save or load restores)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
    tmp = _sibling(target, "tmp")
    old = None
    try:
        write(tmp)
        tmp.mkdir(exist_ok=True)
        with (tmp / MARKER).open("w") as f:  # last: its presence means every file above is complete
            json.dump({"written": time.time(), "pid": os.getpid()}, f)
            f.flush()
            os.fsync(f.fileno())
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):
            remove_directory(tmp)  # now the old directory
        else:
            old = _sibling(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            remove_directory(old)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)  # a failed second rename: the old directory goes back
        raise
    finally:
        remove_directory(tmp)
    return target


def write_text(path: str | Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))


class BusyError(RuntimeError):
    """Another live process holds the lock on an output."""


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (a lock file; ``fcntl.flock``, released by the kernel if the process
    dies) for the block, so that two runs writing the same output (``what``) cannot interleave; a second run
    fails at once, naming the holder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BusyError(f"{what} is being written by {holder} (lock {path}); wait for it to finish or "
                            "write elsewhere") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
