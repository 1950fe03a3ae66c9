"""Running the search: trials on the device, the decision from `policy`, the answer as a `ProbeResult`.

Each trial runs real training steps at one size and reads the device's peak and tensor peak; `policy.decide`
turns the trials so far into the next size or a stop (that module says how, in one paragraph). Everything
that touches the device (cleanup, cache, the autograd queue after a failure) is the backend's and the
workload's, so the decision can be replayed on recorded numbers with nothing patched.
When the counters say nothing, or an out-of-memory error hits a size they said fits, the search falls
back to crash-driven bisection, exact to the size, and says so.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Callable
from time import perf_counter
from typing import Literal

from . import distributed, policy
from ._units import format_bytes
from .accumulation import plan_accumulation
from .devices import MemoryBackend, MemoryLimit
from .errors import AutobatchError, NoBatchSizeFits, first_line, mark_failed_step
from .oom import is_oom_error
from .results import Outcome, ProbeResult, Trial
from .throughput import knee, time_steps
from .workload import Workload

__all__ = ["first_batch_size", "search"]

# Without a requested size, start at 2: BatchNorm needs two samples, and one step costs little.
_SMALL_START = 2
# The seed's 20%-reduction rule: start at 80% of what the user asked for.
_REDUCTION = 0.8
# A step whose tensors read the same over this factor of sizes does not use its batch size: no doubling ends.
_NO_DEPENDENCE = 2**20


def first_batch_size(requested: float | None, multiple_of: int = 1, max_batch_size: int | None = None) -> int:
    """The first size probed: 80% of ``requested`` (the 20%-reduction rule), else a small start.

    Rounded down to ``multiple_of``, never below it, never above ``max_batch_size``.

    Example:
        >>> first_batch_size(32), first_batch_size(32, multiple_of=8), first_batch_size(1), first_batch_size(None)
        (25, 24, 1, 2)
    """
    if requested is None:
        size = max(multiple_of, math.ceil(_SMALL_START / multiple_of) * multiple_of)
    else:
        size = max(multiple_of, int(round(requested * _REDUCTION, 6)) // multiple_of * multiple_of)
    if max_batch_size is not None:
        size = min(size, max(multiple_of, max_batch_size // multiple_of * multiple_of))
    return size


def _point(trial: Trial) -> policy.Point:
    return policy.Point(trial.batch_size, trial.ok, trial.peak_bytes, trial.allocated_bytes, trial.flushed)


class _Trials:
    """The device side of the search: the warm-up, the reading at rest, and trials, recovered after failures."""

    def __init__(
        self,
        workload: Workload,
        backend: MemoryBackend,
        limit: MemoryLimit,
        *,
        headroom: float,
        steps_per_trial: int,
        on_trial: Callable[[Trial], None] | None,
    ) -> None:
        self.workload = workload
        self.backend = backend
        self.limit = limit.bytes
        self.budget = int(limit.bytes * (1 - headroom))
        self.steps = steps_per_trial
        self.on_trial = on_trial
        self.trials: list[Trial] = []
        self.rest = policy.Rest()
        self.last_oom: BaseException | None = None

    def warm_up(self, start: int) -> None:
        """One uncounted step at up to two samples, then at one if two do not fit; then the reading at rest."""
        too_big: BaseException | None = None  # the out-of-memory error of a warm-up at two samples
        for size in dict.fromkeys((min(start, _SMALL_START), 1)):
            try:
                self._warm_up_at(size)
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
        self.backend.clear_cache()
        with self.backend.measure() as idle:
            pass
        self.rest = policy.Rest(idle.peak_bytes, idle.allocated_bytes)

    def _warm_up_at(self, batch_size: int) -> None:
        self.backend.settle()  # a cache left by earlier work would hold the warm-up's tensors
        error = None
        try:
            self.workload.warm_up(batch_size)
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)
            error = exc if is_oom_error(exc) else mark_failed_step(exc, f"at batch size {batch_size} (the warm-up)")
        distributed.agree_on_outcome(error)  # under torchrun: it ran on every rank, or it raises on every rank

    def run(self, batch_size: int) -> Trial:
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
            measured = Trial(
                batch_size,
                outcome,
                peak,
                window.allocated_bytes,
                step_s,
                batch_size / step_s,
                False,
                flushed=window.flushed,
            )
        agreed = distributed.agree_on_trial(measured, self.limit)
        if agreed.outcome == "oom" and measured.outcome != "oom":
            self._recover()  # another rank ran out of memory: this one's step may have stopped half-way
        trial = dataclasses.replace(agreed, fits_budget=_point(agreed).fits(self.budget))
        self.trials.append(trial)
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def _recover(self) -> None:
        try:
            self.workload.recover()
            self.backend.release_failed_step()
        except Exception as exc:  # an OOM while cleaning up must not replace the trial's outcome
            if not is_oom_error(exc):
                raise


def _ask(
    trials: _Trials,
    points: list[policy.Point],
    phase: policy.Phase,
    strategy: policy.Strategy,
    multiple_of: int,
    cap: int | None,
) -> policy.Decision:
    return policy.decide(
        points,
        trials.rest,
        budget=trials.budget,
        limit=trials.limit,
        multiple_of=multiple_of,
        cap=cap,
        phase=phase,
        strategy=strategy,
    )


def _decide_sizes(
    trials: _Trials, start: int, *, multiple_of: int, cap: int | None, find_max: bool
) -> tuple[policy.Strategy, str, int | None]:
    """Run trials from ``start`` until the policy stops: (strategy, note, how many trials the budget took)."""
    strategy: policy.Strategy = "measure"
    note, settled = "", None
    phase: policy.Phase = "budget"
    size: int | None = start
    while size is not None:
        trials.run(size)
        points = [_point(t) for t in trials.trials]
        if strategy == "measure":
            reason = policy.unreliable(points, trials.rest, trials.budget, trials.backend.name)
            if reason is not None:
                strategy, note = "bisect", f"Fell back to crash-driven bisection: {reason}."

        decision = _ask(trials, points, phase, strategy, multiple_of, cap)
        span = policy.flat_span(points)
        if decision.size is not None and span is not None and span[1] >= _NO_DEPENDENCE * span[0]:
            raise AutobatchError(
                f"The step's memory did not change from batch size {span[0]} to {span[1]} "
                f"({format_bytes(points[-1].tensors or 0)} of tensors at each): it does not build its batch from "
                "batch_size, so no size can be measured. Create the batch inside step(batch_size)."
            )
        if decision.size is None and strategy == "measure" and phase == "budget":
            settled = len(points)
            if find_max:
                phase = "limit"
                decision = _ask(trials, points, phase, strategy, multiple_of, cap)
        # Under torchrun every rank runs the same sizes: rank 0 decides, from the agreed trials.
        strategy, note, settled, phase, size = distributed.from_rank_zero(
            (strategy, note, settled, phase, decision.size)
        )
    return strategy, note, settled


def _failed(batch_size: int, error: str) -> Trial:
    return Trial(batch_size, "oom", None, None, None, None, fits_budget=False, error=error)


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
    start: int | None = None,
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
    state = _Trials(workload, backend, limit, headroom=headroom, steps_per_trial=steps_per_trial, on_trial=on_trial)
    start = first_batch_size(requested if start is None else start / _REDUCTION, multiple_of, max_batch_size)
    state.warm_up(start)
    cap = max_batch_size // multiple_of * multiple_of if max_batch_size is not None else None
    strategy, note, settled = _decide_sizes(state, start, multiple_of=multiple_of, cap=cap, find_max=find_max)
    trials = tuple(state.trials)
    # The recommendation rests on the budget's trials only: near the limit the allocator flushes its cache, so
    # driver memory there can read under the budget at sizes far over it.
    budget_points = [_point(t) for t in trials[:settled]]
    verified = [t.batch_size for t in trials if t.ok]
    if strategy == "measure":
        recommended = policy.recommend(budget_points, state.budget)
    else:
        recommended = (
            max(multiple_of, int((1 - headroom) * max(verified)) // multiple_of * multiple_of) if verified else None
        )
        if recommended is not None and any(t.ok and t.peak_bytes is not None for t in trials):
            # The counters still read each step: never above the largest size they put within the budget.
            within = policy.recommend(budget_points, state.budget)
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
    line = policy.fitted_line(budget_points, state.rest, state.budget) if strategy == "measure" else None
    if line is not None and line[0] < 0:
        line = None  # a negative fixed part is no physical line: not shown
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
        strategy=strategy,
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
