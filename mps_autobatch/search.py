"""The decision: from a ``step(batch_size)`` and the device's readings to a `ProbeResult`.

Measure, model, verify. Each trial runs real training steps at one size and reads the device's peak.
Peak memory is close to affine in the batch size, but not at small sizes (allocator rounding, caches),
so the next size comes from a line through measured points near the target (secant steps), aimed at
the lowest size the stopping rule accepts; bisection takes over when interpolation stops shrinking
the bracket.
When the counters say nothing, or an out-of-memory error hits a size they said fits, the search falls
back to crash-driven bisection, exact to the size, and says so.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import traceback
from collections.abc import Callable
from time import perf_counter
from typing import Literal

import torch

from . import distributed
from ._units import format_bytes
from .accumulation import plan_accumulation
from .devices import MemoryBackend, MemoryLimit
from .errors import NoBatchSizeFits, first_line, mark_failed_step
from .oom import is_oom_error
from .results import Outcome, ProbeResult, Trial
from .throughput import knee, time_steps
from .workload import Workload

__all__ = ["first_batch_size", "search"]

# Stop refining once the largest size that fits the budget is within this fraction of where the
# measured line crosses it, or of the largest size that could still fit: one more step near the
# limit costs as much as the whole search so far.
_TOLERANCE = 0.04
# Never jump more than this factor above the largest size that fit: a line fitted at tiny sizes can be
# far off, and on CPU and CUDA an overshoot is real memory, not a caught error.
_MAX_GROWTH = 8
# Without a requested size, start at 2: BatchNorm needs two samples, and one step costs little.
_SMALL_START = 2
# The seed's 20%-reduction rule: start at 80% of what the user asked for.
_REDUCTION = 0.8


def first_batch_size(requested: int | None, multiple_of: int = 1, max_batch_size: int | None = None) -> int:
    """The first size probed: 80% of ``requested`` (the 20%-reduction rule), else a small start.

    Rounded down to ``multiple_of``, never below it, never above ``max_batch_size``.

    Example:
        >>> first_batch_size(32), first_batch_size(32, multiple_of=8), first_batch_size(1), first_batch_size(None)
        (25, 24, 1, 2)
    """
    if requested is None:
        size = max(multiple_of, math.ceil(_SMALL_START / multiple_of) * multiple_of)
    else:
        size = max(multiple_of, int(requested * _REDUCTION) // multiple_of * multiple_of)
    if max_batch_size is not None:
        size = min(size, max(multiple_of, max_batch_size // multiple_of * multiple_of))
    return size


def _release_failed_backward(device: torch.device) -> None:
    """Free what an error inside ``backward()`` left queued.

    When a backward pass fails, the graph's other ready tasks stay in the autograd engine's queue for
    that device, holding the failed step's activations, until the next backward runs there; measured
    on the simulation, a failed ResNet step kept 58 MiB alive through every later trial. A trivial
    backward drains the queue.
    """
    leaf = torch.zeros((), device=device, requires_grad=True)
    (leaf * 1.0).backward()


Line = tuple[float, float]  # (fixed bytes, bytes per sample)


def _line(a: tuple[float, float], b: tuple[float, float]) -> Line | None:
    (x1, y1), (x2, y2) = sorted((a, b))
    if x2 == x1 or y2 <= y1:
        return None
    slope = (y2 - y1) / (x2 - x1)
    return y1 - slope * x1, slope


def _aim_under(crossing: float) -> int:
    """The size to try next toward a budget crossing: the lowest one the stopping rule accepts.

    Landing there ends the search whenever the line holds or overestimates, and lines drawn from
    below do overestimate on an allocator's staircase; landing above the crossing always costs
    another step near the budget, the dearest step of the search. Rounded, not floored: at 25
    samples a floor would add another 4%.

    Example:
        >>> _aim_under(26.5), _aim_under(953.7)
        (25, 916)
    """
    return min(round(crossing * (1 - _TOLERANCE)), math.floor(crossing))


def _ending(failed: int) -> int:
    """The lowest size that ends the search once ``failed`` has not fit: within the tolerance of the size under it.

    Example:
        >>> _ending(46), _ending(128)
        (44, 122)
    """
    return math.ceil((1 - _TOLERANCE) * (failed - 1))


def _steady_base(below: list[tuple[int, int]], target: int) -> tuple[int, int]:
    """The point to extrapolate from with the highest one toward ``target``: the nearest that rose at
    least as far as is left to go, else the next one down.

    Peak memory is a staircase (allocator rounding): two points a few samples apart give a slope
    made of rounding, or none on one stair (measured: efficientnet_b0 at 25 and 27 samples rose
    half as steeply as from 16 to 27). A line is trusted no farther than the rise it was measured
    over, while the nearest such point keeps the slope of the sizes near the target.

    Example:
        >>> _steady_base([(2, 301), (16, 1043), (25, 1484), (27, 1540)], target=1600)  # MiB
        (16, 1043)
        >>> _steady_base([(2, 180), (16, 322), (61, 762), (64, 762)], target=800)  # 61 and 64: one stair
        (16, 322)
    """
    top = below[-1][1]
    return next((p for p in reversed(below[:-1]) if top - p[1] >= target - top), below[-2])


class _Search:
    def __init__(
        self,
        workload: Workload,
        backend: MemoryBackend,
        limit: MemoryLimit,
        *,
        headroom: float,
        multiple_of: int,
        max_batch_size: int | None,
        steps_per_trial: int,
        find_max: bool,
        on_trial: Callable[[Trial], None] | None,
    ) -> None:
        self.workload = workload
        self.backend = backend
        self.limit = limit.bytes
        self.budget = int(limit.bytes * (1 - headroom))
        self.headroom = headroom
        self.m = multiple_of
        self.cap = max_batch_size // multiple_of if max_batch_size is not None else None
        self.steps = steps_per_trial
        self.find_max = find_max
        self.on_trial = on_trial
        self.trials: list[Trial] = []
        self.idle_bytes: int | None = None
        self.idle_gap = 0
        self.last_oom: BaseException | None = None
        self.settled: int | None = None  # how many trials the search for the budget took, once it is over
        self._widths: dict[int, list[int]] = {}  # bracket widths seen, per target

    # --- running trials -------------------------------------------------------------------------------
    def warm_up(self, batch_size: int) -> None:
        gc.collect()  # what earlier work left in reference cycles, once, before anything is measured
        self.backend.clear_cache()  # a cache left by earlier work would hold the warm-up's tensors
        error = None
        try:
            self.workload.warm_up(batch_size)
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)
            error = exc if is_oom_error(exc) else mark_failed_step(exc, f"at batch size {batch_size} (the warm-up)")
        distributed.agree_on_outcome(error)  # under torchrun: it ran on every rank, or it raises on every rank
        self.backend.clear_cache()
        with self.backend.measure() as idle:
            pass
        self.idle_bytes = idle.peak_bytes
        if idle.peak_bytes is not None and idle.allocated_bytes is not None:
            self.idle_gap = idle.peak_bytes - idle.allocated_bytes

    def trial(self, batch_size: int) -> Trial:
        self.backend.clear_cache()
        error, failure = None, None
        try:
            with self.backend.measure() as window:
                start = perf_counter()
                for _ in range(self.steps):
                    self.workload.step(batch_size)
                self.backend.synchronize()
                step_s = (perf_counter() - start) / self.steps
        except Exception as exc:
            # Keep the error for chaining but not its frames: their locals pin the failed step's tensors.
            traceback.clear_frames(exc.__traceback__)
            if not is_oom_error(exc):
                failure = mark_failed_step(exc, f"at batch size {batch_size}")
            else:
                error = str(exc)
                self.last_oom = exc.with_traceback(None)
        if failure is not None:
            # Under torchrun the other ranks wait for this trial's outcome: tell them, then raise it.
            distributed.agree_on_trial(_failed(batch_size, ""), self.limit, failure)
        if error is not None:
            self._recover()
            measured = _failed(batch_size, error)
        else:
            peak = window.peak_bytes
            outcome: Outcome = "over_limit" if peak is not None and peak > self.limit else "ok"
            measured = Trial(batch_size, outcome, peak, window.allocated_bytes, step_s, batch_size / step_s, False)
        agreed = distributed.agree_on_trial(measured, self.limit)
        if agreed.outcome == "oom" and measured.outcome != "oom":
            self._recover()  # another rank ran out of memory: this one's step may have stopped half-way
        fits = agreed.ok and agreed.peak_bytes is not None and agreed.peak_bytes <= self.budget
        trial = dataclasses.replace(agreed, fits_budget=fits)
        self.trials.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def _recover(self) -> None:
        try:
            _release_failed_backward(self.backend.device)
            self.workload.recover()
            gc.collect()  # reference cycles through the failed step's frames can still hold tensors
            self.backend.clear_cache()
        except Exception as exc:  # an OOM while cleaning up must not replace the trial's outcome
            if not is_oom_error(exc):
                raise

    # --- the model of memory ---------------------------------------------------------------------------
    def peak(self, trial: Trial) -> int | None:
        """The reading the budget is decided on: the device's own peak (driver memory on MPS)."""
        return trial.peak_bytes

    def demand(self, trial: Trial) -> int | None:
        """The reading that predicts an out-of-memory error: live tensors plus the idle gap.

        Near the limit the allocator flushes its cache instead of failing, so peak driver memory
        flattens there while the tensors' own demand keeps growing; extrapolating to the limit on
        driver memory overshoots.
        """
        if trial.allocated_bytes is None:
            return trial.peak_bytes
        return trial.allocated_bytes + self.idle_gap

    def _points(self, reading: Callable[[Trial], int | None]) -> list[tuple[int, int]]:
        points = ((t.batch_size, reading(t)) for t in self.trials)
        return sorted((size, value) for size, value in points if value is not None)

    def _around(
        self, target: int, reading: Callable[[Trial], int | None]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The measured points at or under ``target``, and those over it at larger sizes, by size."""
        points = self._points(reading)
        below = [p for p in points if p[1] <= target]
        above = [p for p in points if p[1] > target and (not below or p[0] > below[-1][0])]
        return below, above

    def line_for(self, target: int, reading: Callable[[Trial], int | None] | None = None) -> Line | None:
        """The line through the measured points nearest ``target``: bracketing it when possible."""
        below, above = self._around(target, reading or self.peak)
        if below and above:
            return _line(below[-1], above[0])
        if len(below) >= 2:
            return _line(below[-2], below[-1])
        anchor = below or above[:1]
        if anchor and self.idle_bytes is not None:
            return _line((0, self.idle_bytes), anchor[-1])
        return None

    def crossings_for(
        self, target: int, reading: Callable[[Trial], int | None], lo: int, hi: int | None
    ) -> tuple[float, float] | None:
        """Where memory reaches ``target`` (units of ``multiple_of``): the lowest and highest estimate.

        Peak memory is close to a line but often step-shaped (allocator size classes): the line across
        the bracket can be far off when the target sits on a plateau, so the lines through the two
        nearest points on each side are tried too. The search aims at the lowest crossing inside the
        bracket and stops only when the largest size that fits is close to the highest.
        """
        below, above = self._around(target, reading)
        points = self._points(reading)
        pairs = [(below[-1], above[0])] if below and above else []
        pairs += [(_steady_base(below, target), below[-1])] if len(below) >= 2 else []
        pairs += [(above[0], above[1])] if len(above) >= 2 else []
        if len(points) == 1 and self.idle_bytes is not None:
            pairs.append(((0, self.idle_bytes), points[0]))
        crossings = [
            (target - fixed) / slope / self.m for fixed, slope in filter(None, (_line(a, b) for a, b in pairs))
        ]
        inside = [c for c in crossings if lo < c and (hi is None or c < hi)] or crossings[-1:]
        return (min(inside), max(inside)) if inside else None

    def unreliable(self, trial: Trial) -> str | None:
        """Why the counters cannot guide the search, or None when they can."""
        if trial.ok and trial.peak_bytes is None:
            return f"the step showed no memory signal on {self.backend.name} (its peak read 0)"
        peaks = [value for _, value in self._points(self.peak)]
        at_rest = self.idle_bytes if self.idle_bytes is not None else min(peaks, default=0)
        if trial.ok and len(peaks) >= 2 and max(peaks) <= at_rest:
            # Nothing the step does shows on this device's counter. Equal peaks at two sizes alone are not
            # enough: allocator size classes make peak memory flat over a range of sizes.
            return "the measured peak did not grow with the batch size"
        if trial.outcome == "oom":
            line = self.line_for(self.budget)
            below = [t for t in self.trials if t.ok and t.batch_size < trial.batch_size]
            if line is not None and below and line[0] + line[1] * trial.batch_size <= self.budget:
                predicted = int(line[0] + line[1] * trial.batch_size)
                return (
                    f"batch size {trial.batch_size} ran out of memory where the measurements predicted "
                    f"{predicted / 2**30:.2f} GiB, within the budget"
                )
        return None

    # --- choosing the next size (in units of multiple_of) ----------------------------------------------
    def _bracket(self, fits: Callable[[Trial], bool]) -> tuple[int, int | None]:
        units = [(t.batch_size // self.m, fits(t)) for t in self.trials]
        lo = max((u for u, ok in units if ok), default=0)
        hi = min((u for u, ok in units if not ok and u > lo), default=None)
        return lo, hi

    def next_toward(
        self,
        target: int,
        fits: Callable[[Trial], bool],
        reading: Callable[[Trial], int | None],
        exact: bool,
    ) -> int | None:
        lo, hi = self._bracket(fits)
        if (self.cap is not None and lo >= self.cap) or (hi is not None and hi - lo <= 1):
            return None
        if not exact and hi is not None and lo >= _ending(hi):
            return None
        estimates = self.crossings_for(target, reading, lo, hi)
        widths = self._widths.setdefault(target, [])
        if hi is not None:
            widths.append(hi - lo)
        if hi is not None and len(widths) >= 3 and widths[-1] > widths[-3] / 2:
            guess = (lo + hi) // 2  # two interpolations did not halve the bracket (a step-shaped curve): bisect
        elif estimates is None:
            guess = 2 * lo if hi is None else (lo + hi) // 2
        else:
            crossing, optimistic = estimates
            # A line through the idle reading only says where to look: a step's fixed workspace is not in
            # that reading, so the line is steeper than the curve and its crossing far too low to stop at.
            two_steps = len(self._points(reading)) >= 2
            if not exact and lo > 0 and two_steps and lo >= (1 - _TOLERANCE) * round(optimistic):
                return None
            if hi is not None and crossing >= hi:
                guess = (lo + hi) // 2  # the line contradicts a failure already seen (an OOM has no peak)
            else:
                guess = math.floor(crossing) if exact else _aim_under(crossing)
                if not exact and hi is not None and 0 < lo < _ending(hi) <= optimistic:
                    # Between a fit and a failure the stopping rule needs no line: if the lines allow it, land
                    # where a fit ends the search rather than creep up on the budget one stair at a time.
                    guess = _ending(hi)
                if guess <= lo + 1:
                    # At small sizes the margin would creep up one size per trial: aim at the crossing itself.
                    guess = math.floor(crossing)
        guess = max(guess, lo + 1)
        if lo > 0:
            guess = min(guess, lo * _MAX_GROWTH)
        if hi is not None:
            guess = min(guess, hi - 1)
        if self.cap is not None:
            guess = min(guess, self.cap)
        return guess

    def next_measured(self) -> int | None:
        if self.settled is None:
            guess = self.next_toward(self.budget, lambda t: t.fits_budget, self.peak, exact=False)
            if guess is not None:
                return guess
            self.settled = len(self.trials)
        if not self.find_max:
            return None
        return self.next_toward(self.limit, lambda t: t.ok, self.demand, exact=True)

    def budget_trials(self) -> tuple[Trial, ...]:
        """The trials the recommendation rests on: those of the search for the budget, before any toward the limit.

        Near the limit the allocator flushes its cache, so driver memory there can read under the budget at
        sizes far over it (recorded: resnet18 read 857 MiB at 49 samples and 776 MiB at 70, against a budget of
        819 MiB); with ``find_max``, such a reading would move the recommendation, so the sizes tried toward the
        limit measure the largest size that runs and nothing else.
        """
        return tuple(self.trials[: self.settled])

    def next_bisect(self) -> int | None:
        lo, hi = self._bracket(lambda t: t.ok)
        if self.cap is not None and lo >= self.cap:
            return None
        if hi is None:
            return min(2 * lo, self.cap) if self.cap is not None else 2 * lo
        if hi - lo <= 1:
            return None
        return (lo + hi) // 2

    # --- the whole search ------------------------------------------------------------------------------
    def run(self, start: int) -> tuple[str, str]:
        too_big: BaseException | None = None  # the out-of-memory error of a warm-up at two samples
        for size in dict.fromkeys((min(start, _SMALL_START), 1)):  # when two samples do not fit, one may
            try:
                self.warm_up(size)
                break
            except Exception as exc:
                if not is_oom_error(exc) and too_big is None:
                    raise
                if size > 1:
                    self._recover()
                    too_big = exc
                    continue
                # One sample may be no step at all (BatchNorm cannot train on it): the size that did not fit is
                # the answer's reason, not the model.
                oom_at, also = size, ""
                cause: BaseException = exc
                if too_big is not None and not is_oom_error(exc):
                    oom_at, cause, also = 2, too_big, f"; at 1: {type(exc).__name__}: {first_line(exc)}"
                raise NoBatchSizeFits(
                    f"No batch size fits in {format_bytes(self.limit)}: the warm-up step at batch size "
                    f"{oom_at} ran out of memory ({first_line(cause)}){also}. Use a "
                    "smaller model or input, or a larger memory limit.",
                    trials=(),
                    limit_bytes=self.limit,
                ) from exc
        strategy, note = "measure", ""
        units: int | None = start // self.m
        while units is not None:
            trial = self.trial(units * self.m)
            if strategy == "measure":
                reason = self.unreliable(trial)
                if reason is not None:
                    strategy, note = "bisect", f"Fell back to crash-driven bisection: {reason}."
            units = self.next_measured() if strategy == "measure" else self.next_bisect()
            # Under torchrun every rank runs the same sizes: rank 0 decides, from the agreed trials.
            strategy, note, units = distributed.from_rank_zero((strategy, note, units))
        return strategy, note


def _failed(batch_size: int, error: str) -> Trial:
    return Trial(batch_size, "oom", None, None, None, None, fits_budget=False, error=error)


def _largest_fitting(trials: tuple[Trial, ...]) -> int | None:
    """The largest size that fit the budget and is smaller than every size that did not.

    Memory grows with the batch size; a size that reads under the budget above one that read over it
    was measured while the allocator flushed its cache under pressure (near the limit, with find_max),
    and training at it would run over the budget.
    """
    over = min((t.batch_size for t in trials if not t.fits_budget), default=None)
    fitting = (t.batch_size for t in trials if t.fits_budget and (over is None or t.batch_size < over))
    return max(fitting, default=None)


def search(
    workload: Workload,
    backend: MemoryBackend,
    limit: MemoryLimit,
    *,
    headroom: float = 0.2,
    requested: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    steps_per_trial: int = 1,
    find_max: bool = False,
    objective: Literal["memory", "throughput"] = "memory",
    on_trial: Callable[[Trial], None] | None = None,
) -> ProbeResult:
    """Find the largest batch size whose measured peak fits ``limit`` minus ``headroom``.

    With ``objective="throughput"``, then time the sizes that fit (and half and a quarter of the
    largest) and recommend the knee: the smallest within 5% of the best samples/s.

    The backend's session (the cap while probing) must already be open; `find_safe_batch_size` does
    that and validates the arguments, and is what users call.

    Raises:
        NoBatchSizeFits: not even ``multiple_of`` samples fit, chained from the last out-of-memory error.
        Exception: anything the step raises that is not an out-of-memory error, unchanged.
    """
    began = perf_counter()
    state = _Search(
        workload,
        backend,
        limit,
        headroom=headroom,
        multiple_of=multiple_of,
        max_batch_size=max_batch_size,
        steps_per_trial=steps_per_trial,
        find_max=find_max,
        on_trial=on_trial,
    )
    strategy, note = state.run(first_batch_size(requested, multiple_of, max_batch_size))
    trials = tuple(state.trials)
    verified = [t.batch_size for t in trials if t.ok]
    if strategy == "measure":
        recommended = _largest_fitting(state.budget_trials())
    else:
        recommended = (
            max(multiple_of, int((1 - headroom) * max(verified)) // multiple_of * multiple_of) if verified else None
        )
        if recommended is not None and any(t.ok and t.peak_bytes is not None for t in trials):
            # The counters still read each step: never above the largest size they put within the budget.
            within = _largest_fitting(state.budget_trials())
            recommended = min(recommended, within) if within is not None else None
    if recommended is None:
        smallest = min(trials, key=lambda t: t.batch_size)
        reason = smallest.error or f"its peak of {(smallest.peak_bytes or 0) / 2**30:.2f} GiB is over the budget"
        raise NoBatchSizeFits(
            f"No batch size fits in {limit.bytes / 2**30:.2f} GiB minus {headroom:.0%} headroom: batch size "
            f"{smallest.batch_size} failed ({reason.splitlines()[0]}). Use a smaller model or input, less "
            "headroom, or a larger memory limit.",
            trials=trials,
            limit_bytes=limit.bytes,
        ) from state.last_oom
    line = state.line_for(state.budget) if strategy == "measure" else None
    rates: tuple[tuple[int, float], ...] = ()
    chosen = recommended
    if objective == "throughput":
        fitting = {
            t.batch_size for t in trials if (t.fits_budget or strategy == "bisect") and t.batch_size <= recommended
        }
        halves = {max(multiple_of, recommended // d // multiple_of * multiple_of) for d in (2, 4)}
        rates = time_steps(workload, backend, fitting | halves | {recommended})
        chosen = knee(rates)
    return ProbeResult(
        batch_size=chosen,
        max_batch_size=max(verified),
        device=backend.name,
        limit_bytes=limit.bytes,
        limit_source=limit.source,
        budget_bytes=state.budget,
        headroom=headroom,
        fixed_bytes=int(line[0]) if line else None,
        per_sample_bytes=int(line[1]) if line else None,
        strategy=strategy,  # type: ignore[arg-type]
        note=note,
        steps_per_trial=steps_per_trial,
        requested=requested,
        accumulation=plan_accumulation(requested, chosen) if requested is not None else None,
        trials=trials,
        elapsed_s=perf_counter() - began,
        objective=objective,
        memory_batch_size=recommended,
        throughput=rates,
    )
