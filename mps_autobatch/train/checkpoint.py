"""A run's files and what keeps them whole: atomic checkpoints, metrics, the run folder, and Ctrl-C.

Checkpoints (last.pt, best.pt) and metrics (CSV and JSON) are written atomically; `prepare_output` refuses to
overwrite a run and checks a resume; a Ctrl-C is held back until the update is whole, then saved and raised
(the RNG states a checkpoint holds come from `mps_autobatch.step.rng_state`).

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
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "KILL_HOOK",
    "METRIC_COLUMNS",
    "NOTE",
    "TrainingInterrupted",
    "UnreadableCheckpoint",
    "deferred",
    "hold",
    "load_checkpoint",
    "release",
    "remove_temporary_files",
    "save_checkpoint",
    "stop",
    "unfinished",
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
    "eval_batch_size",
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


# --- Ctrl-C --------------------------------------------------------------------------------------------------
# Ctrl-C during training: held back while an update or an epoch's bookkeeping runs, then raised.
#
# A KeyboardInterrupt in the middle of an update would leave half of it done (accumulated gradients, moved
# BatchNorm statistics, drawn random numbers, some parameters stepped and others not), and a checkpoint of that
# could not be resumed exactly. So while `hold` is in force a first Ctrl-C is only noted (one line on stderr),
# and `release` raises it once the update is whole; a second Ctrl-C raises at once, and `unfinished` then tells
# the trainer not to save. Waiting for data and evaluating are not held: nothing there changes the run's state.
#
# The handler is installed by `deferred` only in the main thread and only over Python's default SIGINT handler
# (an application's own handler, e.g. a notebook's, is left alone; `unfinished` still guards the save).

NOTE = "Ctrl-C: finishing this update, then saving last.pt (Ctrl-C again stops at once, without saving)."
"""The line printed when a Ctrl-C is held back."""

RESUME = "run the same command with --resume to continue"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train`; ``checkpoint`` is the last.pt it saved for ``resume``, None when nothing was saved.

    A KeyboardInterrupt, so code that catches that sees it as before; the message says what was saved.
    """

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class _Guard:
    held = False  # an update (or an epoch's bookkeeping and checkpoint) is under way
    pending = False  # a Ctrl-C came while held


_guard = _Guard()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _guard.held and not _guard.pending:
        _guard.pending = True
        with suppress(OSError, ValueError):  # stderr closed: the note is a courtesy
            print(NOTE, file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back Ctrl-C inside `hold` ... `release` while the block runs (a no-op outside the main thread)."""
    _guard.held = _guard.pending = False
    install = threading.current_thread() is threading.main_thread()
    install = install and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if install:
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def hold() -> None:
    """From here to `release`, a first Ctrl-C waits."""
    _guard.held = True


def release() -> None:
    """End `hold`; raise the KeyboardInterrupt held back since, if any."""
    _guard.held = False
    if _guard.pending:
        _guard.pending = False
        raise KeyboardInterrupt


def unfinished() -> bool:
    """Whether a KeyboardInterrupt came between `hold` and `release`: the run's state is half an update."""
    return _guard.held


def stop(save: Callable[[], None], checkpoint: Path, position: str) -> TrainingInterrupted:
    """Save the run after a KeyboardInterrupt (unless it came mid-update) and say so, as the exception to raise.

    ``position`` describes where the run is, e.g. "update 6 (epoch 1, 6 of 8 batches done)".
    """
    reason = "in the middle of an update"
    if not unfinished():
        hold()  # a further Ctrl-C waits for the save; a third one abandons it (the write is atomic)
        try:
            save()
            return TrainingInterrupted(f"Interrupted after {position}: saved {checkpoint}; {RESUME}.", checkpoint)
        except KeyboardInterrupt:
            reason = "again while saving"
        finally:
            _guard.held = _guard.pending = False
    if checkpoint.is_file():
        fix = f"{RESUME} from {checkpoint}, the last checkpoint."
    else:
        fix = "no checkpoint was written yet."
    return TrainingInterrupted(f"Interrupted {reason}: nothing saved; {fix}", None)


# --- the run folder --------------------------------------------------------------------------------------


def prepare_output(config: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite a run or resume another one."""
    folder, last = config.output_dir, config.output_dir / "last.pt"
    if not config.resume:
        if last.exists():
            raise ValueError(f"{str(folder)!r} already holds a run. Pass --resume to continue it, or another --output.")
        remove_temporary_files(folder)  # a first run killed while writing its first last.pt
        return None
    if not last.is_file():
        raise ValueError(f"Nothing to resume: {str(last)!r} not found. Drop --resume to start a new run.")
    try:
        saved = load_checkpoint(last)
    except UnreadableCheckpoint as exc:
        fix = "Pass another --output to start a new run"
        if (folder / "best.pt").is_file():
            fix = "Copy best.pt over it to resume from the best epoch, or pass another --output to start a new run"
        raise ValueError(f"Cannot resume from {str(last)!r}: {exc.reason}. {fix}.") from exc
    mismatch = config.resume_mismatch(saved["config"])
    if mismatch is not None:
        raise ValueError(f"Cannot resume {str(folder)!r}: {mismatch}. Pass the same options, or another --output.")
    remove_temporary_files(folder)  # left by a run killed mid-write; last.pt is the last complete checkpoint
    return saved
