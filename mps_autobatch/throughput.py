"""The throughput objective: larger is not always faster (on MPS especially), so time the sizes that fit."""

from __future__ import annotations

from collections.abc import Iterable
from time import perf_counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .devices import MemoryBackend
    from .workload import Workload

__all__ = ["KNEE_TOLERANCE", "knee", "time_steps"]

KNEE_TOLERANCE = 0.05
"""A size within this fraction of the best samples/s is as good as the best."""


def time_steps(
    workload: Workload, backend: MemoryBackend, sizes: Iterable[int], steps: int = 3
) -> tuple[tuple[int, float], ...]:
    """Samples per second of each size: one warm-up step, then ``steps`` synchronized steps timed together.

    Timing runs outside the memory measurement, so no per-module synchronize slows it down.
    """
    rates = []
    for size in sorted(set(sizes)):
        backend.clear_cache()
        workload.step(size)
        backend.synchronize()
        start = perf_counter()
        for _ in range(steps):
            workload.step(size)
        backend.synchronize()
        rates.append((size, size * steps / (perf_counter() - start)))
    return tuple(rates)


def knee(rates: Iterable[tuple[int, float]], tolerance: float = KNEE_TOLERANCE) -> int:
    """The smallest size whose samples/s is within ``tolerance`` of the best.

    Example:
        >>> knee([(8, 90.0), (16, 118.0), (32, 121.0), (48, 119.0)])
        16
    """
    rates = list(rates)
    best = max(rate for _, rate in rates)
    return min(size for size, rate in rates if rate >= (1 - tolerance) * best)
