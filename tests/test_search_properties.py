"""Properties of the search over synthetic memory curves: safe, within budget, quick, exact with find_max.

The workload does no torch work (tests/memory_curves.py): its peak memory is a curve of the batch size, affine
and monotone non-decreasing, optionally with bounded noise (deterministic per size) and rounded up to blocks from
some size on; a step over the limit raises PyTorch's exact MPS out-of-memory text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from memory_curves import Curve, CurveBackend, CurveWorkload

from mps_autobatch import NoBatchSizeFits
from mps_autobatch.results import ProbeResult, Trial
from mps_autobatch.search import search

MiB, GiB = 2**20, 2**30
EXAMPLES = settings(max_examples=200, deadline=None, derandomize=True, database=None)


@dataclass(frozen=True)
class Case:
    curve: Curve
    cap: int  # max_batch_size
    noisy: bool
    headroom: float
    warm_up_steps: bool
    report_allocated: bool

    @property
    def budget(self) -> int:
        return int(self.curve.limit * (1 - self.headroom))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    cap = draw(st.integers(2, 4096), label="max_batch_size")
    limit = draw(st.integers(256 * MiB, 64 * GiB), label="limit")
    rest = int(limit * draw(st.floats(0.0, 0.9), label="at rest / limit"))
    fits = draw(st.integers(1, 2 * cap), label="sizes that fit, before noise and rounding")
    slope = (limit - rest) / (fits + 0.5)
    noise = draw(st.sampled_from([0.0]) | st.floats(0.0, 4.0), label="noise, in samples") * slope
    seed = draw(st.integers(0, 2**32 - 1), label="noise seed")
    block = draw(st.none() | st.integers(1, max(1, limit // 10)), label="rounding block")
    rounded_from = draw(st.integers(0, cap), label="rounded from size")
    peaks, highest = [], 0
    for size in range(cap + 1):
        value = rest + slope * size + noise * random.Random(seed * 8192 + size).random()
        if block is not None and size >= rounded_from:
            value = math.ceil(value / block) * block
        highest = max(highest, int(value))  # monotone: noise and rounding never make a larger batch smaller
        peaks.append(highest)
    return Case(
        Curve(tuple(peaks), limit),
        cap,
        noisy=noise > 0,
        headroom=draw(st.floats(0.0, 0.6), label="headroom"),
        warm_up_steps=draw(st.booleans(), label="warm-up runs a step"),
        report_allocated=draw(st.booleans(), label="live bytes reported"),
    )


def _search(case: Case, find_max: bool) -> tuple[ProbeResult | None, tuple[Trial, ...]]:
    backend = CurveBackend(case.curve, case.report_allocated)
    workload = CurveWorkload(backend, case.warm_up_steps)
    try:
        result = search(
            workload, backend, backend.limit(), headroom=case.headroom, max_batch_size=case.cap, find_max=find_max
        )
    except NoBatchSizeFits as exc:
        return None, exc.trials
    return result, result.trials


def _log2(cap: int) -> int:
    return math.ceil(math.log2(cap))


def _check(case: Case, find_max: bool) -> None:
    result, trials = _search(case, find_max)
    peaks, largest = case.curve.peaks, case.curve.largest_that_runs()
    if result is None or result.strategy == "bisect":
        # Crash-driven bisection (after the counters failed to predict): doubling from the largest size that ran up
        # to the first failure, then halving that bracket to one size, each at most ceil(log2(cap)) trials.
        assert len(trials) <= 2 * _log2(case.cap) + 2
    elif find_max:
        # The budget search, then an exact search for the limit, which cannot stop within 4% as the first does.
        assert len(trials) <= 2 * _log2(case.cap) + 4
    else:
        assert len(trials) <= _log2(case.cap) + 4
    if result is None:
        assert peaks[1] > case.budget  # not even one sample fits the budget
        return
    assert result.max_batch_size <= largest
    assert peaks[result.batch_size] <= case.budget
    if find_max and not case.noisy:
        assert result.max_batch_size >= largest - 1


@EXAMPLES
@given(case=cases())
def test_the_search_is_safe_within_budget_and_quick(case):
    _check(case, find_max=False)


@EXAMPLES
@given(case=cases())
def test_find_max_is_safe_within_budget_quick_and_exact_without_noise(case):
    _check(case, find_max=True)
