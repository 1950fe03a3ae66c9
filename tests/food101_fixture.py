"""Tiny on-disk datasets in the official Food-101 and class-per-folder layouts, and a local HTTP server with Range.

Everything is generated in a test's tmp_path: a few 40 x 30 JPEGs of seeded noise per class (noise, so that two
crops of the same picture differ), plus one "JPEG" of garbage bytes for the corrupt-file path.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

# classes.txt order is deliberately not alphabetical: labels must follow the file, not a sort.
CLASSES = ("churros", "apple_pie", "bibimbap")
TRAIN_PER_CLASS = 5
TEST_PER_CLASS = 2
CORRUPT = "apple_pie/corrupt"  # listed in meta/train.txt, garbage bytes on disk


def write_jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


def write_food101(data_dir: Path) -> Path:
    """Write ``data_dir/food-101`` in the official layout; return ``data_dir``."""
    root = data_dir / "food-101"
    train, test = [], []
    for c, name in enumerate(CLASSES):
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            write_jpeg(root / "images" / name / f"{i}.jpg", seed=100 * c + i)
            (train if i < TRAIN_PER_CLASS else test).append(f"{name}/{i}")
    (root / "images" / f"{CORRUPT}.jpg").write_bytes(b"\x00 not a jpeg \xff" * 10)
    train.append(CORRUPT)
    (root / "meta").mkdir()
    (root / "meta" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    return data_dir


def write_imagefolder(root: Path, counts: dict[str, int]) -> Path:
    """One sub-folder per class with ``counts[class]`` JPEGs; return ``root``."""
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            write_jpeg(root / name / f"{i:03d}.jpg", seed=1000 * c + i)
    return root


def make_archive(data_dir: Path, names: Sequence[str] = ("food-101",)) -> bytes:
    """A .tar.gz of ``data_dir``'s entries ``names``, as bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            tar.add(data_dir / name, arcname=name)
    return buffer.getvalue()


def md5_of(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves ``server.payload`` at any path; honours ``Range: bytes=N-`` unless told not to."""

    server: ArchiveServer

    def do_GET(self) -> None:
        server, data = self.server, self.server.payload
        requested = self.headers.get("Range")
        server.ranges.append(requested)
        start = 0
        if requested and server.honour_range:
            start = int(requested.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_at is not None:  # send part of the body, then drop the connection
            body, server.cut_at = body[: server.cut_at - start], None
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class ArchiveServer(ThreadingHTTPServer):
    """A local server for one payload, recording the Range header of every request (None when absent)."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.payload = payload
        self.ranges: list[str | None] = []
        self.honour_range = True
        self.cut_at: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/food-101.tar.gz"


@contextmanager
def serve(payload: bytes) -> Iterator[ArchiveServer]:
    server = ArchiveServer(payload)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
