"""The library's own failures and warnings, carrying the data a user interface needs to explain them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import Trial

__all__ = ["AutobatchError", "AutobatchWarning", "NoBatchSizeFits"]


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
