"""The search's decision as a pure rule: from the sizes measured so far to the next size to try, or stop.

No torch and no device here: `decide` takes numbers (each trial's size, whether it ran, its peak, its tensor
bytes) and returns a `Decision`, so a replay or a test drives it without running anything.

How it decides, in one paragraph (the README says the same):

    Each trial reads two numbers: the device's peak (what the limit counts: tensors, plus the allocator's
    rounding, cache and its other allocations) and the tensor peak (live tensor bytes, which grow almost
    exactly linearly in the batch size). Tensor bytes get a straight line through the largest size measured
    and one at most half of it; the memory a step adds above rest is taken to grow in proportion to the
    tensor bytes it adds, at the ratio measured at the largest size within the budget (never less than 1:1).
    After a first trial at 2 samples that fits, the second is 8 times that; after that, each is 97 % of
    where the prediction meets the budget, at most 8 times the largest fit. Between a fit and a failure it
    is where the straight line between their peaks meets the budget (the prediction, if the failure ran out
    of memory and has no peak), at least an eighth of the bracket in from either end, and the middle when
    the prediction contradicts the failure or two tries did not halve the bracket. The search stops only when
    the largest size that fits is at least 96 % of the largest that could (the one under the smallest size
    that did not fit, at most ``max_batch_size``): an answer within 4 % of the best for any allocator whose
    peak grows with the batch, whatever the prediction said. So a fit that cannot end the search is
    followed by the smallest size whose failure would end it, and between a fit and a failure a size where
    either outcome ends the search is tried when there is one.

Phases are explicit: "budget" finds the recommendation; "limit" (only with ``find_max``) then brackets the
largest size that runs, exactly, without moving the recommendation. Strategies are explicit too: "measure"
(the counters guide the search) or "bisect" (crash-driven, when the counters say nothing or an out-of-memory
error hits a size they said fits).

Example:
    >>> MiB = 2**20
    >>> rest = Rest(peak=100 * MiB, tensors=80 * MiB)
    >>> points = [Point(2, True, 140 * MiB, 110 * MiB), Point(16, True, 280 * MiB, 180 * MiB)]
    >>> decide(points, rest, budget=800 * MiB, limit=1000 * MiB)
    Decision(size=71, reason='97% of where the measurements meet the budget (73.8)')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AIM",
    "MAX_GROWTH",
    "TOLERANCE",
    "Decision",
    "Phase",
    "Point",
    "Rest",
    "Strategy",
    "decide",
    "fitted_line",
    "flat_span",
    "recommend",
    "stop_reason",
    "tensor_line",
    "unreliable",
]

Strategy = Literal["measure", "bisect"]
Phase = Literal["budget", "limit"]

# The answer is within this fraction of the largest size that could still fit: one more step near the budget
# costs about as much as the whole search so far.
TOLERANCE = 0.04
# Aim this far under the predicted crossing: a fit there is followed by the one size whose failure ends the
# search, while a size over the budget costs a step at the dearest sizes and more after it. (Replayed on 10
# recorded and 400 random curves, 0.97, 0.985 and 1.0 traded answers for cost: benchmarks/search_replay.py.)
AIM = 0.97
# Never more than this factor above the largest size that fit: the tensor peak is the highest of the step's phases
# (the optimizer step's at small sizes, backward's at large ones), so a line drawn at small sizes can be far off.
MAX_GROWTH = 8


@dataclass(frozen=True)
class Point:
    """One trial as the decision sees it.

    Attributes:
        size: the batch size.
        ran: the step ran within the limit (no out-of-memory error, not over the limit).
        peak: the reading the limit counts (driver memory on MPS, reserved on CUDA), None if unknown.
        tensors: the live-tensor peak, None if unknown (then ``peak`` stands in for it).
        flushed: the allocator released its cache inside the step, so ``peak`` is lower than its high point.
    """

    size: int
    ran: bool
    peak: int | None
    tensors: int | None = None
    flushed: bool = False

    def fits(self, budget: int) -> bool:
        """It ran, its high point was read (no flush hid it), and that is within ``budget``."""
        return self.ran and not self.flushed and self.peak is not None and self.peak <= budget


@dataclass(frozen=True)
class Rest:
    """The readings with the model and optimizer state loaded and nothing running (after the warm-up)."""

    peak: int | None = None
    tensors: int | None = None

    @property
    def gap(self) -> int:
        """What the device holds beyond tensors at rest (Metal, MPSGraph, the CUDA context): never freed."""
        if self.peak is None or self.tensors is None:
            return 0
        return max(self.peak - self.tensors, 0)


@dataclass(frozen=True)
class Decision:
    """The next size to try, or None to stop; ``reason`` says why, in words."""

    size: int | None
    reason: str


# --- the model of memory ---------------------------------------------------------------------------------------
def _measured(points: Sequence[Point]) -> list[Point]:
    """The trials that ran with a reading, by size, one per size (the last)."""
    by_size = {p.size: p for p in points if p.ran and p.peak is not None}
    return [by_size[size] for size in sorted(by_size)]


def _tensors(point: Point) -> int:
    return point.tensors if point.tensors is not None else point.peak  # type: ignore[return-value]


def _tensor_line(points: Sequence[Point], rest: Rest) -> tuple[float, float, bool] | None:
    """(fixed, per sample, from rest): tensor bytes on a line from the largest size measured, else rest and one.

    The line's other point is the largest size at most half the largest (else the smallest): sizes a few
    samples apart give a slope made of allocator rounding.
    """
    measured = _measured(points)
    if len(measured) >= 2:
        top = measured[-1]
        base = next((p for p in reversed(measured[:-1]) if p.size <= top.size / 2), measured[0])
        (x1, y1), (x2, y2) = (base.size, _tensors(base)), (top.size, _tensors(top))
        slope = (y2 - y1) / (x2 - x1)
        return (y2 - slope * x2, slope, False) if slope > 0 else None
    if len(measured) == 1 and rest.tensors is not None:
        x, y = measured[0].size, _tensors(measured[0])
        slope = (y - rest.tensors) / x
        return (rest.tensors, slope, True) if slope > 0 else None
    return None


def tensor_line(points: Sequence[Point]) -> tuple[float, float] | None:
    """``(fixed, per_sample)`` of the tensor peak's straight line (the same line the decision draws), or None.

    Example:
        >>> tensor_line([Point(2, True, 140, 110), Point(16, True, 280, 180)])
        (100.0, 5.0)
    """
    line = _tensor_line(points, Rest())
    return None if line is None else (line[0], line[1])


def _anchor(points: Sequence[Point], target: int) -> Point | None:
    """The trial whose overhead ratio predicts best near ``target``: the largest unflushed one at or under it,
    else the smallest one over it."""
    measured = [p for p in _measured(points) if not p.flushed]
    under = [p for p in measured if p.peak <= target]  # type: ignore[operator]
    over = [p for p in measured if p.peak > target]  # type: ignore[operator]
    return under[-1] if under else (over[0] if over else None)


def fitted_line(points: Sequence[Point], rest: Rest, target: int) -> tuple[float, float] | None:
    """The predicted peak as ``fixed + per_sample * size`` near ``target``, or None without two readings.

    Tensor bytes follow their line; the peak adds, on top of the reading at rest, the step's added tensor
    bytes times the ratio (peak - rest peak) / (tensors - rest tensors) measured at the anchor trial.

    Example:
        >>> MiB = 2**20
        >>> pts = [Point(2, True, 140 * MiB, 110 * MiB), Point(16, True, 280 * MiB, 180 * MiB)]
        >>> fixed, per_sample = fitted_line(pts, Rest(100 * MiB, 80 * MiB), 800 * MiB)
        >>> round(fixed / MiB), round(per_sample / MiB, 2)
        (136, 9.0)
    """
    line, anchor = _tensor_line(points, rest), _anchor(points, target)
    if line is None or anchor is None:
        return None
    fixed, slope, _ = line
    if rest.peak is None or rest.tensors is None or _tensors(anchor) <= rest.tensors:
        ratio, base_peak, base_tensors = 1.0, anchor.peak - _tensors(anchor), 0.0  # type: ignore[operator]
    else:
        # Driver memory grows at least as fast as the tensors in it (a flat reading is one allocator stair).
        ratio = max(1.0, (anchor.peak - rest.peak) / (_tensors(anchor) - rest.tensors))  # type: ignore[operator]
        base_peak, base_tensors = rest.peak, rest.tensors
    return base_peak + ratio * (fixed - base_tensors), ratio * slope


def _crossing(points: Sequence[Point], rest: Rest, target: int, lo: int, hi: int | None) -> float | None:
    """Where the peak meets ``target``, in samples: between a fit and a failure that both have a reading, where
    the straight line between them meets it; else where the prediction does."""
    below = [p for p in _measured(points) if p.size == lo and not p.flushed]
    above = [p for p in _measured(points) if p.size == hi and not p.flushed]
    if below and above and above[0].peak > target >= below[0].peak:  # type: ignore[operator]
        (x1, y1), (x2, y2) = (below[0].size, below[0].peak), (above[0].size, above[0].peak)
        return x1 + (target - y1) * (x2 - x1) / (y2 - y1)  # type: ignore[operator]
    line = fitted_line(points, rest, target)
    if line is None or line[1] <= 0:
        return None
    return (target - line[0]) / line[1]


def _demand_crossing(points: Sequence[Point], rest: Rest, limit: int) -> float | None:
    """Where tensor bytes plus what the device holds at rest meet ``limit``, in samples.

    Near the limit the allocator flushes its cache instead of failing, so the peak reading flattens there
    while the tensors' demand keeps growing: the limit is met where the demand meets it.
    """
    line = _tensor_line(points, rest)
    if line is None:
        return None
    fixed, slope, _ = line
    return (limit - rest.gap - fixed) / slope


# --- the stopping rule -----------------------------------------------------------------------------------------
def _bracket(points: Sequence[Point], fits: Callable[[Point], bool]) -> tuple[int, int | None]:
    """(lo, hi) in samples: the smallest size that did not fit, and the largest that fit below it (0 if none)."""
    ok = [(p.size, fits(p)) for p in points]
    hi = min((size for size, good in ok if not good), default=None)
    lo = max((size for size, good in ok if good and (hi is None or size < hi)), default=0)
    return lo, hi


def stop_reason(lo: int, hi: int | None, *, cap: int | None, exact: bool) -> str | None:
    """Why the search stops now, or None to go on: the whole stopping rule.

    ``lo`` is the largest size that fit below ``hi``, the smallest that did not (None: none failed yet), both
    in units of ``multiple_of``; ``exact`` is the limit phase (``find_max``) and crash-driven bisection.

    ============================================  ==============  =========================================
    case                                          budget phase    limit phase (exact)
    ============================================  ==============  =========================================
    ``hi`` is the next size above ``lo`` (or 1)   stop            stop
    nothing fits yet (``lo == 0``)                go on           go on
    ``lo`` reached ``cap`` (``max_batch_size``)   stop            stop
    ``lo >= 96 % of (hi - 1)``                    stop            go on
    ``lo >= 96 % of cap``                         stop            go on
    otherwise                                     go on           go on
    ============================================  ==============  =========================================

    Example:
        >>> stop_reason(44, 46, cap=None, exact=False)
        'the largest size that fit (44) is within 4% of the largest that could (45)'
        >>> stop_reason(44, 46, cap=None, exact=True) is None
        True
    """
    if hi is not None and hi - lo <= 1:
        return f"{lo} fit and {hi}, the next size, did not" if lo else f"{hi}, the smallest size, did not fit"
    if lo == 0:
        return None
    if cap is not None and lo >= cap:
        return f"the largest size that fit ({lo}) is max_batch_size"
    if exact:
        return None
    ceiling = min(hi - 1 if hi is not None else math.inf, cap if cap is not None else math.inf)
    if lo >= (1 - TOLERANCE) * ceiling:
        return f"the largest size that fit ({lo}) is within {TOLERANCE:.0%} of the largest that could ({ceiling})"
    return None


# --- the next size (everything in units of multiple_of from here) --------------------------------------------
def _halvings_stalled(points: Sequence[Point], fits: Callable[[Point], bool]) -> bool:
    """Two interpolations in a row did not halve the bracket (a step-shaped curve): time to bisect."""
    widths = []
    for end in range(1, len(points) + 1):
        lo, hi = _bracket(points[:end], fits)
        if hi is not None and lo > 0:
            widths.append(hi - lo)
    return len(widths) >= 3 and widths[-1] > widths[-3] / 2


def _within(size: float, low: int, high: float) -> int:
    return int(min(max(low, math.floor(size)), high))


def _next_for_budget(points: Sequence[Point], rest: Rest, budget: int, top: float) -> Decision:
    """``top``: the largest size that could still fit (under the smallest failure, at most the cap)."""
    fits = lambda p: p.fits(budget)  # noqa: E731
    lo, hi = _bracket(points, fits)
    crossing = _crossing(points, rest, budget, lo, hi)
    if lo == 0:  # nothing fits yet: under the smallest size that did not, by the line when there is one
        size = AIM * crossing if crossing is not None and crossing < top else hi // 2  # type: ignore[operator]
        return Decision(_within(size, 1, top), "nothing fit yet: under the smallest size that did not")
    line = _tensor_line(points, rest)
    if crossing is None:
        size, why = (2 * lo, "no line yet: twice the largest fit") if hi is None else ((lo + hi) / 2, "no line: bisect")
    elif hi is None and line is not None and line[2]:
        size, why = (
            MAX_GROWTH * lo,
            f"{MAX_GROWTH} x the first: the line from rest says only that the budget is farther",
        )
    else:
        aim = AIM if hi is None else 1.0  # between a fit and a failure, no margin: either outcome narrows it
        size, why = aim * crossing, f"{aim:.0%} of where the measurements meet the budget ({crossing:.1f})"
    if hi is not None and crossing is not None and crossing >= hi:
        size, why = (lo + hi) / 2, "the prediction contradicts a failure: bisect"
    if hi is not None and _halvings_stalled(points, fits):
        size, why = (lo + hi) / 2, "two interpolations did not halve the bracket: bisect"
    if hi is not None:
        # Interpolation converges from one side on a curve that bends: take at least an eighth of the bracket.
        size = min(max(size, lo + (hi - lo) / 8), hi - (hi - lo) / 8)
    edge = math.floor(lo / (1 - TOLERANCE)) + 1  # a failure at or under it ends the search
    if hi is not None:
        ending = math.ceil((1 - TOLERANCE) * top)  # a fit at or over it ends the search
        if ending <= min(edge, top):
            return Decision(_within(min(max(size, ending), edge), ending, top), why + "; either outcome ends it")
    if hi is None:
        size = min(size, MAX_GROWTH * lo)  # the tensor peak is a maximum over the step's phases: it has kinks
    if size < edge:
        return Decision(_within(edge, lo + 1, top), why + f"; {edge}, the smallest size whose failure ends it")
    return Decision(_within(size, lo + 1, top), why)


def _next_for_limit(points: Sequence[Point], rest: Rest, limit: int, top: float) -> Decision:
    lo, hi = _bracket(points, lambda p: p.ran)
    crossing = _demand_crossing(points, rest, limit)
    if lo == 0:
        return Decision(_within(hi // 2, 1, top), "nothing ran yet: half the smallest size that did not")  # type: ignore[operator]
    if crossing is None:
        size, why = (2 * lo, "no line: twice the largest that ran") if hi is None else ((lo + hi) / 2, "bisect")
    else:
        size, why = crossing, f"where tensors and what the device holds at rest meet the limit ({crossing:.1f})"
        if hi is not None and crossing >= hi:
            size, why = (lo + hi) / 2, "the line contradicts a failure: bisect"
    if hi is not None and _halvings_stalled(points, lambda p: p.ran):
        size, why = (lo + hi) / 2, "two interpolations did not halve the bracket: bisect"
    if hi is None:
        size = min(size, MAX_GROWTH * lo)
    return Decision(_within(size, lo + 1, top), why)


def _next_for_bisect(points: Sequence[Point], top: float) -> Decision:
    lo, hi = _bracket(points, lambda p: p.ran)
    if hi is None:
        return Decision(_within(2 * lo, lo + 1, top), "crash-driven: double until a size fails")
    return Decision(_within((lo + hi) / 2, lo + 1, top), "crash-driven: halve the bracket")


def decide(
    points: Sequence[Point],
    rest: Rest,
    *,
    budget: int,
    limit: int,
    multiple_of: int = 1,
    cap: int | None = None,
    phase: Phase = "budget",
    strategy: Strategy = "measure",
) -> Decision:
    """The next size to try after ``points`` (every trial so far, in order), or a stop, with the reason.

    ``cap`` is ``max_batch_size``; every size is a multiple of ``multiple_of``. With ``strategy="bisect"`` the readings
    are ignored: double until a size fails, then halve the bracket to one size.

    Example:
        >>> MiB = 2**20
        >>> pts = [Point(2, True, 300 * MiB, 250 * MiB), Point(16, True, 500 * MiB, 390 * MiB),
        ...        Point(47, True, 790 * MiB, 600 * MiB), Point(49, True, 830 * MiB, 615 * MiB)]
        >>> decide(pts, Rest(200 * MiB, 180 * MiB), budget=800 * MiB, limit=1000 * MiB)
        Decision(size=None, reason='the largest size that fit (47) is within 4% of the largest that could (48)')
    """
    m = multiple_of
    units = [Point(p.size // m, p.ran, p.peak, p.tensors, p.flushed) for p in points]
    cap_units = cap // m if cap is not None else None
    if strategy == "bisect":
        lo, hi = _bracket(units, lambda p: p.ran)
        reason = stop_reason(lo, hi, cap=cap_units, exact=True)
        decision = _next_for_bisect(units, cap_units if cap_units is not None else math.inf)
    else:
        fits = (lambda p: p.fits(budget)) if phase == "budget" else (lambda p: p.ran)
        lo, hi = _bracket(units, fits)
        reason = stop_reason(lo, hi, cap=cap_units, exact=phase == "limit")
        top = min(hi - 1 if hi is not None else math.inf, cap_units if cap_units is not None else math.inf)
        if phase == "budget":
            decision = _next_for_budget(units, rest, budget, top)
        else:
            decision = _next_for_limit(units, rest, limit, top)
    if reason is not None:
        return Decision(None, _in_samples(reason, m))
    assert decision.size is not None
    return Decision(decision.size * m, _in_samples(decision.reason, m))


def _in_samples(reason: str, multiple_of: int) -> str:
    if multiple_of == 1:
        return reason
    return reason + f" (in multiples of {multiple_of})"


def recommend(points: Sequence[Point], budget: int) -> int | None:
    """The largest size that fit ``budget`` and is smaller than every size that did not.

    Memory grows with the batch size; a size that reads under the budget above one that read over it was
    measured while the allocator flushed its cache under pressure, and training at it would run over.

    Example:
        >>> recommend([Point(2, True, 10), Point(40, True, 90), Point(30, True, 70)], budget=80)
        30
    """
    lo, _ = _bracket(points, lambda p: p.fits(budget))
    return lo or None


_STEP_IGNORES_BATCH = (
    "the measured peak did not grow with the batch size; the likely cause is a step that reuses a batch built "
    "outside it (only what the step allocates is measured): create the batch inside step(batch_size)"
)


def flat_span(points: Sequence[Point]) -> tuple[int, int] | None:
    """(smallest, largest) size of the steps that ran, when all of them read the same tensor peak to the byte.

    A step that builds its batch allocates more at a larger size; identical tensor peaks at three or more sizes
    are a step whose memory does not depend on its batch size (one that reuses a batch built outside it).

    Example:
        >>> flat_span([Point(2, True, 90, 60), Point(16, True, 90, 60), Point(128, True, 90, 60)])
        (2, 128)
    """
    ran = [p for p in points if p.ran and p.tensors is not None]
    if len(ran) < 3 or len({p.tensors for p in ran}) > 1:
        return None
    return min(p.size for p in ran), max(p.size for p in ran)


def unreliable(points: Sequence[Point], rest: Rest, budget: int, device: str) -> str | None:
    """Why the counters cannot guide the search after the last of ``points``, or None when they can.

    Example:
        >>> unreliable([Point(2, True, None)], Rest(), 100, "cpu")
        'the step showed no memory signal on cpu (its peak read 0)'
    """
    last = points[-1]
    if last.ran and last.peak is None:
        return f"the step showed no memory signal on {device} (its peak read 0)"
    peaks = [p.peak for p in _measured(points)]
    at_rest = rest.peak if rest.peak is not None else min(peaks, default=0)  # type: ignore[type-var]
    if last.ran and len(peaks) >= 2 and max(peaks) <= at_rest:  # type: ignore[type-var,operator]
        # Nothing the step does shows on this device's counter. Equal peaks at two sizes alone are not
        # enough: allocator size classes make peak memory flat over a range of sizes.
        return _STEP_IGNORES_BATCH
    span = flat_span(points)
    # A peak set by a fixed part (the optimizer step of a large model) is flat at small sizes too, until the
    # activations outgrow it: only a flat reading over a wide range says the step ignores its batch size.
    if last.ran and span is not None and span[1] >= 1024 * span[0]:
        return _STEP_IGNORES_BATCH
    if not last.ran and last.peak is None:
        below = [p for p in points[:-1] if p.ran and p.size < last.size]
        line = fitted_line(below, rest, budget) if below else None
        if line is not None and line[0] + line[1] * last.size <= budget:
            predicted = line[0] + line[1] * last.size
            return (
                f"batch size {last.size} ran out of memory where the measurements predicted "
                f"{predicted / 2**30:.2f} GiB, within the budget"
            )
    return None
