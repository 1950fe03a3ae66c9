"""A workload and a backend for driving `mps_autobatch.search.search` with a synthetic memory curve, no torch work.

The curve gives the peak bytes at each batch size (index 0: at rest, what the backend reads with nothing running);
a step whose peak is over the limit raises PyTorch's exact MPS out-of-memory text instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from oom_texts import MPS_LIMITED_GIB

from mps_autobatch.devices import MemoryBackend, MemoryLimit, PeakWindow


@dataclass(frozen=True)
class Curve:
    """Peak bytes at each batch size 0..len(peaks) - 1 (index 0: at rest), and the device's limit.

    ``tensors``, if given, are the live-tensor peaks at the same sizes (at most the peaks); else live bytes read
    as the peak.
    """

    peaks: tuple[int, ...]
    limit: int
    tensors: tuple[int, ...] | None = None

    def largest_that_runs(self) -> int:
        """The largest size whose peak is within the limit, 0 if none."""
        return max((size for size, peak in enumerate(self.peaks) if size and peak <= self.limit), default=0)


class CurveBackend(MemoryBackend):
    """Counters that read the curve: the highest peak of the window (and as live bytes, if ``report_allocated``)."""

    name = "curve"

    def __init__(self, curve: Curve, report_allocated: bool = True) -> None:
        self.curve = curve
        self.report_allocated = report_allocated
        self.highest = 0

    def limit(self, memory_limit: int | None = None) -> MemoryLimit:
        return MemoryLimit(self.curve.limit, "memory_limit")

    def in_use_bytes(self) -> int:
        return self.curve.peaks[0]

    def settle(self) -> None:
        """A curve allocates nothing: nothing to collect (a full collection costs 0.1 s with torch loaded)."""

    def release_failed_step(self) -> None:
        """A failed step of a curve leaves nothing behind."""

    @contextmanager
    def measure(self) -> Iterator[PeakWindow]:
        window = PeakWindow()
        self.highest = 0  # the size that ran (0: at rest)
        yield window
        tensors = self.curve.tensors or self.curve.peaks
        window.peak_bytes = self.curve.peaks[self.highest] or None
        window.allocated_bytes = (tensors[self.highest] or None) if self.report_allocated else None


class CurveWorkload:
    """A step that "allocates" the curve's peak, or raises the MPS out-of-memory error above the limit.

    With ``warm_up_steps`` the uncounted warm-up runs a step too, as both workloads do; without it, the warm-up
    does nothing (the idle reading is taken before any step). ``warm_ups`` and ``sizes`` record the sizes asked
    for, uncounted and counted.
    """

    def __init__(self, backend: CurveBackend, warm_up_steps: bool = True) -> None:
        self.backend = backend
        self.warm_up_steps = warm_up_steps
        self.warm_ups: list[int] = []
        self.sizes: list[int] = []

    def warm_up(self, batch_size: int) -> None:
        self.warm_ups.append(batch_size)
        if self.warm_up_steps:
            self._run(batch_size)

    def step(self, batch_size: int) -> None:
        self.sizes.append(batch_size)
        self._run(batch_size)

    def _run(self, batch_size: int) -> None:
        peak = self.backend.curve.peaks[min(batch_size, len(self.backend.curve.peaks) - 1)]  # past the end: the last
        if peak > self.backend.curve.limit:
            raise RuntimeError(MPS_LIMITED_GIB)
        self.backend.highest = max(self.backend.highest, min(batch_size, len(self.backend.curve.peaks) - 1))

    def recover(self) -> None:
        """Nothing to undo: a failed step allocated nothing."""


def curve_of(peaks: Sequence[int], limit: int) -> tuple[Curve, CurveBackend, CurveWorkload]:
    curve = Curve(tuple(peaks), limit)
    backend = CurveBackend(curve)
    return curve, backend, CurveWorkload(backend)
