"""A run's files: atomic checkpoints (last.pt, best.pt) and metrics as CSV and JSON (RNG states: `step.rng_state`).

Every file is written to a temporary file in the same folder, flushed to disk, then renamed over the
old one (``os.replace`` is atomic on POSIX and Windows), so a crash or a full disk leaves either the old
file or the new one, never half of one. A process killed mid-write leaves its temporary file behind
(``.last.pt.<random>.tmp``); `remove_temporary_files` clears them when the next run starts.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_checkpoint(Path(tmp) / "last.pt", {"epoch": 3, "model": {"weight": torch.ones(2)}})
    ...     loaded = load_checkpoint(path)
    >>> loaded["epoch"], loaded["model"]["weight"].tolist()
    (3, [1.0, 1.0])
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "KILL_HOOK",
    "METRIC_COLUMNS",
    "UnreadableCheckpoint",
    "load_checkpoint",
    "remove_temporary_files",
    "save_checkpoint",
    "write_metrics",
]

METRIC_COLUMNS: tuple[str, ...] = (
    "epoch",
    "update",
    "lr",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "images_per_s",
    "epoch_s",
    "micro_batch_size",
    "accumulation_steps",
    "effective_batch_size",
    "oom_retries",
    "skipped_images",
    "memory_bytes",
)
"""One row per epoch in metrics.csv (and in metrics.json's "epochs")."""


# The files a run writes with `_write_atomic`; their temporary files are ".<name>.<random>.tmp".
_RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "metrics.json")

# TEST HOOK, not a feature: AUTOBATCH_TEST_KILL_BEFORE_RENAME=NAME[:N] makes the Nth write (default the 1st) of a
# file called NAME in this process SIGKILL the process after the temporary file is written and fsynced, just
# before the rename: "killed while writing a checkpoint", made reproducible (tests/test_train_faults.py).
# Unset, it costs one environment lookup per file written.
KILL_HOOK = "AUTOBATCH_TEST_KILL_BEFORE_RENAME"
_writes: Counter[str] = Counter()


def _kill_before_rename_hook(name: str) -> None:
    spec = os.environ.get(KILL_HOOK)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target == name:
        _writes[name] += 1
        if _writes[name] == int(count or 1):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that exists but cannot be loaded: ``path`` and the ``reason``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"Cannot read checkpoint {str(path)!r}: {reason}. Pass another checkpoint (a run folder holds "
            "last.pt and best.pt)."
        )
        self.path, self.reason = path, reason


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        _kill_before_rename_hook(path.name)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def remove_temporary_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files a killed run left in its folder (``.last.pt.<random>.tmp`` and the like).

    Only a run's own files are matched; returns what was deleted. A run calls this before it writes, so no
    writer of its own can be using them (two runs sharing one folder are not supported).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (Path(tmp) / ".last.pt.k2j8x0.tmp").write_bytes(b"half")
        ...     _ = (Path(tmp) / "notes.tmp").write_bytes(b"mine")
        ...     removed = remove_temporary_files(tmp)
        ...     left = sorted(p.name for p in Path(tmp).iterdir())
        >>> [p.name for p in removed], left
        (['.last.pt.k2j8x0.tmp'], ['notes.tmp'])
    """
    folder, removed = Path(folder), []
    for name in _RUN_FILES:
        for temp in sorted(folder.glob(f".{name}.*.tmp")):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save``, atomically (a temporary file, fsync, then ``os.replace``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return _write_atomic(Path(path), buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` onto the CPU.

    Raises:
        ValueError: the file does not exist; `UnreadableCheckpoint` (a ValueError) when it is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} not found. Pass the last.pt or best.pt of a run folder.")
    try:
        # weights_only=False: the checkpoint holds numpy and Python RNG states, which the safe loader refuses;
        # only load checkpoints you wrote.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # damaged bytes fail in pickle, zip or torch code, each with its own exception type
        # The first sentence: torch adds a paragraph of advice to a broken zip archive's error.
        reason = str(exc).splitlines()[0].split(". ")[0].rstrip(".") if str(exc) else type(exc).__name__
        raise UnreadableCheckpoint(path, f"damaged or not a torch file ({reason})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise UnreadableCheckpoint(path, "not an autobatch training checkpoint (no model state in it)")
    return state


def write_metrics(folder: str | Path, epochs: Sequence[dict[str, Any]], extra: dict[str, Any]) -> tuple[Path, Path]:
    """Write metrics.csv (one row per epoch, `METRIC_COLUMNS`) and metrics.json (``extra`` plus the rows).

    Example:
        >>> import json, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     csv_path, json_path = write_metrics(tmp, [{"epoch": 1, "val_top1": 0.5}], {"model": "m"})
        ...     header = csv_path.read_text().splitlines()[0]
        ...     data = json.loads(json_path.read_text())
        >>> header.split(",")[:3], data["model"], data["epochs"][0]["val_top1"]
        (['epoch', 'update', 'lr'], 'm', 0.5)
    """
    folder = Path(folder)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(epochs)
    csv_path = _write_atomic(folder / "metrics.csv", text.getvalue().encode())
    document = {**extra, "epochs": list(epochs)}
    json_path = _write_atomic(folder / "metrics.json", json.dumps(document, indent=2).encode())
    return csv_path, json_path
