"""A run's files: atomic checkpoints (last.pt, best.pt), metrics as CSV and JSON, and the RNG states.

Every file is written to a temporary file in the same folder, flushed to disk, then renamed over the
old one (``os.replace`` is atomic on POSIX and Windows), so a crash or a full disk leaves either the old
file or the new one, never half of one.

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
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "METRIC_COLUMNS",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
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


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save``, atomically (a temporary file, fsync, then ``os.replace``)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return _write_atomic(Path(path), buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` onto the CPU.

    Raises:
        ValueError: the file does not exist or is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} not found. Pass the last.pt or best.pt of a run folder.")
    # weights_only=False: the checkpoint holds numpy and Python RNG states, which the safe loader refuses;
    # only load checkpoints you wrote.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{str(path)!r} is not an autobatch training checkpoint (no model state in it).")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random-number state a training step reads: Python, numpy, torch CPU and the device's."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `rng_state` returned (the device's state only on the same kind of device)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


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
