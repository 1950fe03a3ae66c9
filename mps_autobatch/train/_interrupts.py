"""Ctrl-C during training: held back while an update or an epoch's bookkeeping runs, then raised.

A KeyboardInterrupt in the middle of an update would leave half of it done (accumulated gradients, moved
BatchNorm statistics, drawn random numbers, some parameters stepped and others not), and a checkpoint of that
could not be resumed exactly. So while `hold` is in force a first Ctrl-C is only noted (one line on stderr),
and `release` raises it once the update is whole; a second Ctrl-C raises at once, and `unfinished` then tells
the trainer not to save. Waiting for data and evaluating are not held: nothing there changes the run's state.

The handler is installed by `deferred` only in the main thread and only over Python's default SIGINT handler
(an application's own handler, e.g. a notebook's, is left alone; `unfinished` still guards the save).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

__all__ = ["NOTE", "TrainingInterrupted", "deferred", "hold", "release", "stop", "unfinished"]

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
