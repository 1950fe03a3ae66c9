"""The library's own failures and warnings, carrying the data a user interface needs to explain them."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Trial

__all__ = ["AutobatchError", "AutobatchWarning", "NoBatchSizeFits", "failed_step", "first_line", "mark_failed_step"]

_FAILED_STEP = "_autobatch_failed_step"


class AutobatchError(Exception):
    """Base class of every failure mps_autobatch raises on purpose."""


class AutobatchWarning(UserWarning):
    """Something worth knowing that did not stop the work (a corrupt cache file, a fallback)."""


class NoBatchSizeFits(AutobatchError):
    """Not even the smallest batch size ran within the memory limit.

    Attributes:
        trials: every trial that was run, the failing ones included.
        limit_bytes: the limit the trials were held to.
    """

    def __init__(self, message: str, *, trials: tuple[Trial, ...], limit_bytes: int) -> None:
        super().__init__(message)
        self.trials = trials
        self.limit_bytes = limit_bytes


def mark_failed_step(error: BaseException, where: str) -> BaseException:
    """Tag ``error`` as raised inside a training step (``where``, e.g. "at batch size 2"), and return it.

    The error itself is not replaced (callers may hold it, tests compare it by identity): a user
    interface asks `failed_step` to tell a failure of the user's model or of torch, reported as one line,
    from a wrong argument (the library's own checks) or a bug in the library (a traceback).

    Example:
        >>> error = mark_failed_step(ValueError("Expected more than 1 value per channel"), "at batch size 1")
        >>> failed_step(error), failed_step(ValueError("bad argument"))
        ('at batch size 1', None)
    """
    # An exception type without a __dict__ cannot be tagged: it is reported with its traceback.
    if failed_step(error) is None:
        with contextlib.suppress(AttributeError):
            setattr(error, _FAILED_STEP, where)
    return error


def failed_step(error: BaseException) -> str | None:
    """Where the training step ``error`` came from was running, if it came from one (`mark_failed_step`)."""
    where = getattr(error, _FAILED_STEP, None)
    return where if isinstance(where, str) else None


def first_line(error: BaseException) -> str:
    """What one line of a message can say about ``error``: its first line, or its type's name when it has none.

    Example:
        >>> first_line(RuntimeError("out of memory\\nmore detail")), first_line(MemoryError())
        ('out of memory', 'MemoryError')
    """
    return str(error).splitlines()[0] if str(error) else type(error).__name__
