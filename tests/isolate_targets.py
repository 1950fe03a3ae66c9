"""Targets for tests/test_isolate.py, at module level so that spawned children can unpickle them by name.

Each factory runs in the child and returns the step function the search calls.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def aborting_step(above: int = 37) -> Callable[[int], None]:
    """Aborts the process (SIGABRT, as Metal does in pytorch/pytorch#84039) above ``above``; allocates nothing."""

    def step(batch_size: int) -> None:
        if batch_size > above:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file for a deliberate abort
            os.abort()

    return step


def hanging_step(above: int = 20, sleep_s: float = 30.0) -> Callable[[int], None]:
    """Sleeps ``sleep_s`` above ``above``, like a step that swaps or deadlocks."""

    def step(batch_size: int) -> None:
        if batch_size > above:
            time.sleep(sleep_s)

    return step


def raising_step(kind: str) -> Callable[[int], None]:
    """Raises a user bug ("value"), an unpicklable exception ("locked"), or exits with code 3 ("exit")."""

    def step(batch_size: int) -> None:
        if kind == "value":
            raise ValueError("user bug")
        if kind == "locked":
            raise LockedError("holds a lock")
        sys.exit(3)

    return step
