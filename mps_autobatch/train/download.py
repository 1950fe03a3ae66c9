"""Fetch the official Food-101 archive: resumable, size- and md5-checked, safely extracted.

Only the standard library talks to the server (urllib), so the download adds no dependency; the progress bar
(rich) is drawn only when asked for.
"""

from __future__ import annotations

import hashlib
import http.client
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import AutobatchError

__all__ = ["FOOD101_MD5", "FOOD101_SIZE", "FOOD101_URL", "DownloadError", "download_food101"]

# The official archive and its published size and checksum (REFERENCE.md F).
FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
FOOD101_SIZE = 4_996_278_331
FOOD101_MD5 = "85eeb15f3717b99a5da872d97d918f87"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0
# tarfile's extraction filters (PEP 706) arrived in 3.12 and were backported to 3.10.12 and 3.11.4.
_FILTER_ERRORS: tuple[type[Exception], ...] = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


class DownloadError(AutobatchError):
    """A download that could not finish: no connection, a cut-off transfer, a wrong size or checksum."""


@contextmanager
def _progress_bar(enabled: bool, *, total: int, done: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_bytes)``; a rich bar on stderr when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda n_bytes: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n_bytes: bar.advance(task, n_bytes)


def _stopped(url: str, got: int, size: int, reason: str = "") -> str:
    return f"Download of {url} stopped at {got:,} of {size:,} bytes{reason}. Run the command again to resume."


def _reported_total(response: http.client.HTTPResponse, start: int) -> int | None:
    """The whole file's size as the server states it (``Content-Range`` for a resumed transfer)."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None else None


def _open(url: str, start: int, *, part: Path, data_dir: Path) -> http.client.HTTPResponse:
    """Open ``url``, asking for the bytes from ``start`` on (an HTTP Range request) when resuming."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the partial file is not a prefix of the server's file
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} refused to resume from byte {start:,}; the partial download was removed. Run the command again."
            ) from exc
        raise DownloadError(
            f"{url} answered HTTP {exc.code} ({exc.reason}). Check the URL, or try again later."
        ) from exc
    except OSError as exc:  # URLError, refused connections and timeouts
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"Cannot reach {url}: {reason}. Download it elsewhere and extract it into {data_dir}, "
            "or check your connection."
        ) from exc


def _fetch(url: str, part: Path, *, size: int, progress: bool, data_dir: Path) -> None:
    """Download ``url`` into ``part``, continuing a partial file when the server allows it."""
    start = part.stat().st_size if part.exists() else 0
    if start > size:
        part.unlink()
        start = 0
    if start == size:
        return
    with _open(url, start, part=part, data_dir=data_dir) as response:
        if response.status != 206:  # the server ignored the Range header: start over
            start = 0
        total = _reported_total(response, start)
        if total is not None and total != size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} serves {total:,} bytes, expected {size:,}. Check the URL and the expected size."
            )
        with (
            part.open("ab" if start else "wb") as file,
            _progress_bar(progress, total=size, done=start, label="food-101.tar.gz") as advance,
        ):
            try:
                while chunk := response.read(_CHUNK_BYTES):
                    file.write(chunk)
                    advance(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                file.flush()
                raise DownloadError(_stopped(url, part.stat().st_size, size, f" ({exc!r})")) from exc


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, *, url: str, size: int, md5: str) -> None:
    """Check size and md5; a file that can never become right is removed, a short one kept for resuming."""
    got = path.stat().st_size
    if got < size:
        raise DownloadError(_stopped(url, got, size))
    if got > size:
        path.unlink()
        raise DownloadError(f"'{path}' is {got:,} bytes, expected {size:,}; removed it. Run the command again.")
    digest = _md5(path)
    if digest != md5:
        path.unlink()
        raise DownloadError(
            f"Checksum mismatch for '{path}': md5 {digest}, expected {md5}. "
            "The corrupt download was removed; run the command again."
        )


def _check_members(tar: tarfile.TarFile) -> None:
    """Refuse absolute paths, '..' and links: the check ``filter="data"`` does, for Pythons without it."""
    for member in tar.getmembers():
        path = Path(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise DownloadError(f"Archive entry {member.name!r} is unsafe to extract; nothing was extracted.")


def _extract(archive: Path, data_dir: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(data_dir, filter="data")
            else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                _check_members(tar)
                tar.extractall(data_dir)
    except _FILTER_ERRORS as exc:
        raise DownloadError(f"Archive '{archive}' holds an unsafe entry ({exc}); extraction stopped.") from exc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(
            f"Archive '{archive}' cannot be read ({exc}). Delete it and run the command again."
        ) from exc


def download_food101(
    data_dir: str | Path,
    *,
    url: str = FOOD101_URL,
    md5: str = FOOD101_MD5,
    size: int = FOOD101_SIZE,
    progress: bool = True,
) -> Path:
    """Download, check and extract Food-101 into ``data_dir``, resuming an earlier cut-off transfer.

    The archive (about 5 GB) is written to ``data_dir/food-101.tar.gz.part``; a rerun after a cut-off continues with
    an HTTP Range request. Once its size and md5 match it is renamed ``food-101.tar.gz``, extracted (members that
    would land outside ``data_dir`` are refused) and deleted, since a complete dataset never needs it again.

    Args:
        data_dir: the folder that will contain ``food-101/``; created if missing.
        url: where to fetch the archive.
        md5: the archive's expected md5 (hex).
        size: the archive's expected size in bytes.
        progress: draw a rich progress bar on stderr.

    Returns:
        The extracted dataset folder, ``data_dir/food-101``.

    Raises:
        DownloadError: the server cannot be reached, the transfer was cut off (rerun to resume), the size or md5
            is wrong (the bad file is removed), or the archive cannot be extracted safely.
    """
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / "food-101.tar.gz"
    if archive.exists():  # checked before, then extraction was interrupted
        _verify(archive, url=url, size=size, md5=md5)
    else:
        part = data_dir / "food-101.tar.gz.part"
        _fetch(url, part, size=size, progress=progress, data_dir=data_dir)
        _verify(part, url=url, size=size, md5=md5)
        part.replace(archive)
    _extract(archive, data_dir)
    folder = data_dir / "food-101"
    if not folder.is_dir():
        raise DownloadError(f"Archive '{archive}' holds no 'food-101' folder. Check the URL.")
    archive.unlink()
    return folder
