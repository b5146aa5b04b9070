"""Config checks that every entry point runs before any work, and the one-line report of errors the user caused.

Lives at the bottom of the wings so that every entry point can use it: the runner and the bench mains through
:mod:`odllm.config` (which adds the checks of train/compress/evaluate/benchmark keys), the mains of
``python -m odllm.index`` and ``python -m odllm.data.prepare`` directly (:func:`check_index`, :func:`check_prepare`).
Each message names the key, what it must be and a valid example, e.g. ``ratio='abc' is outside (0, 1]: ...``.
"""

from __future__ import annotations

import dataclasses
import functools
import linecache
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

D = TypeVar("D")

F = TypeVar("F", bound=Callable[..., Any])
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent  # train.py, compress.py, evaluate.py
SEED_MAX = 2**32 - 1  # Lightning's seed_everything replaces a seed outside [0, 2**32 - 1] by a random one
INDEX_EMBEDDINGS = ("auto", "text", "collaborative", "sasrec")  # index.embeddings: item vectors the indexer can read


class ConfigError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the key and an example."""


# ---------------------------------------------------------------------------------------------------- primitives
def value(cfg: DictConfig, key: str, example: Any) -> Any:
    """The value at a dotted ``key``; a mandatory ``???`` that was never set is a ConfigError naming the key."""
    if _missing(cfg, key):
        raise ConfigError(f"{key} is required: set it on the command line, e.g. {key}={example}")
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _missing(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node.keys() and OmegaConf.is_missing(node, leaf)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(cfg: DictConfig, key: str, low: float | None, high: float | None, example: Any, *,
           closed: str = "[]", optional: bool = False, why: str = "") -> float | None:
    """A finite number in the interval from ``low`` to ``high`` (None: unbounded); ``closed`` as in "(]"; ``why``
    says what the key means."""
    v = value(cfg, key, example)
    if v is None and optional:
        return None
    inside = _is_number(v) and (
        (low is None or (v >= low if closed[0] == "[" else v > low))
        and (high is None or (v <= high if closed[1] == "]" else v < high))
    )
    if not inside:
        interval = (f"{'(-inf' if low is None else closed[0] + str(low)}, "
                    f"{'inf)' if high is None else str(high) + closed[1]}")
        none = " (null turns it off)" if optional else ""
        what = f"is outside {interval}" if _is_number(v) else f"must be a number in {interval}"
        raise ConfigError(f"{key}={v!r} {what}{': ' + why if why else ''}, e.g. {key}={example}{none}")
    return float(v)


def integer(cfg: DictConfig, key: str, minimum: int | None, example: Any, *, maximum: int | None = None,
            optional: bool = False) -> int | None:
    """A whole number >= ``minimum`` (and <= ``maximum``); None passes when ``optional``."""
    v = value(cfg, key, example)
    if v is None and optional:
        return None
    if not _is_int(v) or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        none = " (or null)" if optional else ""
        raise ConfigError(f"{key}={v!r} must be a whole number {bounds}{none}, e.g. {key}={example}")
    return v


def choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> Any:
    v = value(cfg, key, choices[0])
    if not any(v == c and type(v) is type(c) for c in choices):  # True == 1, but true is no choice of 1
        raise ConfigError(f"{key}={v!r} is not one of {', '.join(map(str, choices))}, e.g. {key}={choices[0]}")
    return v


def boolean(cfg: DictConfig, key: str) -> bool:
    v = value(cfg, key, "true")
    if not isinstance(v, bool):
        raise ConfigError(f"{key}={v!r} must be true or false, e.g. {key}=true")
    return v


def text(cfg: DictConfig, key: str, example: str, *, optional: bool = False) -> str | None:
    v = value(cfg, key, example)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{key}={v!r} must be a non-empty string, e.g. {key}={example}")
    return v


def int_list(cfg: DictConfig, key: str, minimum: int, example: str) -> list[int]:
    """A non-empty list of whole numbers >= ``minimum``."""
    v = value(cfg, key, example)
    items = list(v) if isinstance(v, ListConfig | list | tuple) else None
    if not items or not all(_is_int(i) and i >= minimum for i in items):
        raise ConfigError(f"{key}={_show(v)} must be a non-empty list of whole numbers >= {minimum}, "
                          f"e.g. '{key}={example}'")
    return items


def _show(v: Any) -> str:
    return repr(OmegaConf.to_container(v) if isinstance(v, ListConfig | DictConfig) else v)


# ------------------------------------------------------------------------------------ sections every entry reads
def check_seed(cfg: DictConfig) -> None:
    integer(cfg, "seed", 0, 42, maximum=SEED_MAX)


def check_dataset(cfg: DictConfig) -> None:
    """``dataset.*`` and ``task.max_history``: what reading the data and splitting it use."""
    text(cfg, "dataset.name", "ml-100k")
    fmt = choice(cfg, "dataset.format", ("atomic", "lcrec", "csv"))
    text(cfg, "dataset.path" if fmt == "csv" else "dataset.dir", "/path/to/interactions.csv" if fmt == "csv"
         else "/path/to/data/Instruments")
    choice(cfg, "dataset.item_tokens", ("atomic", "semantic", "learned"))
    integer(cfg, "dataset.min_interactions", 3, 3)  # the leave-one-out split needs 3 items per user
    integer(cfg, "task.max_history", 1, 20)


def check_task(cfg: DictConfig) -> None:
    """``task.*`` of training and calibration windows."""
    choice(cfg, "task.mode", ("all_positions", "per_prefix"))
    stride = integer(cfg, "task.window_stride", 1, 10, optional=True)
    history = cfg.task.max_history
    if stride is not None and stride > history:
        raise ConfigError(f"task.window_stride={stride} must lie in [1, task.max_history={history}], "
                          f"e.g. task.window_stride={max(1, history // 2)} (or null)")
    for key in ("item2index", "index2item"):
        number(cfg, f"task.item_text.{key}", 0, None, 1.0)
    integer(cfg, "task.item_text.max_text_tokens", 1, 64)


# -------------------------------------------------------------------------------- python -m odllm.index / prepare
def check_index(cfg: DictConfig) -> None:
    """Every key ``python -m odllm.index`` reads (conf/index.yaml)."""
    check_seed(cfg)
    check_dataset(cfg)
    text(cfg, "paths.indices_dir", "indices")
    text(cfg, "index.name", "ml-100k-text", optional=True)
    if choice(cfg, "index.embeddings", INDEX_EMBEDDINGS) == "sasrec":
        text(cfg, "index.sasrec.path", "outputs/train/Instruments/<run>/sasrec.pt")
    for key, low, example in (("text.batch_size", 1, 64), ("text.max_length", 1, 128), ("collaborative.dim", 1, 64),
                              ("collaborative.window", 1, 5), ("levels", 1, 4), ("codebook_size", 2, 256),
                              ("latent_dim", 1, 32), ("epochs", 1, 300), ("batch_size", 1, 1024),
                              ("kmeans_iters", 0, 50), ("sinkhorn.iters", 1, 50), ("sinkhorn.rounds", 0, 20)):
        integer(cfg, f"index.{key}", low, example)
    int_list(cfg, "index.hidden", 1, "[256,128]")
    number(cfg, "index.beta", 0, None, 0.25)
    number(cfg, "index.lr", 0, None, 1e-3, closed="(]")
    number(cfg, "index.weight_decay", 0, None, 1e-4)
    number(cfg, "index.sinkhorn.epsilon", 0, None, 0.003)
    boolean(cfg, "index.progress")


def check_prepare(cfg: DictConfig) -> None:
    """Every key ``python -m odllm.data.prepare`` reads (conf/prepare.yaml)."""
    raw = text(cfg, "prepare.raw_dir", "/path/to/amazon18")
    if not Path(raw).is_dir():
        raise ConfigError(f"prepare.raw_dir={raw!r} is not a directory: point it at the folder holding the "
                          "<category>_5.json.gz and meta_<category>.json.gz files, e.g. prepare.raw_dir=/data/amazon18")
    text(cfg, "prepare.category", "Musical_Instruments")
    text(cfg, "prepare.name", "Instruments")
    text(cfg, "prepare.out_dir", "data")
    integer(cfg, "prepare.k", 1, 5)


# ----------------------------------------------------------------------------------------- one-line user errors
USER_ERROR_TYPES = (ValueError, OSError, ImportError, KeyError, TypeError)


def debug() -> bool:
    """``HYDRA_FULL_ERROR=1`` or ``ODLLM_DEBUG=1``: show every traceback in full."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HYDRA_FULL_ERROR", "ODLLM_DEBUG"))


def is_user_error(error: BaseException) -> bool:
    """A ConfigError, or an error that odllm itself raised with a message (a ``raise`` statement in odllm's
    code or the entry scripts): a bad input, not a bug; anything else keeps its traceback."""
    if isinstance(error, ConfigError):
        return True
    if not isinstance(error, USER_ERROR_TYPES) or not str(error):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    ours = PACKAGE_DIR in path.parents or path.parent == REPO_DIR
    return ours and linecache.getline(str(path), tb.tb_lineno).lstrip().startswith("raise")


def one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split())


def user_errors(main: F) -> F:
    """Wraps an entry point (under ``@hydra.main``): an error the user caused prints ``error: <message>`` on
    stderr and exits with status 1, instead of Hydra's traceback; with ``HYDRA_FULL_ERROR=1`` or ``ODLLM_DEBUG=1``
    the error goes on to Hydra, which shows it with its traceback."""

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            if debug() or not is_user_error(error):
                raise
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    return run  # type: ignore[return-value]


def settings_from(cls: type[D], values: Mapping, *, skip_none: bool = False) -> D:
    """A settings dataclass from a config entry (a plain mapping): keys it has no field for are left out (a dataset
    entry also carries item_tokens etc.); with ``skip_none`` a null value keeps the field's default."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known and not (skip_none and v is None)})
