"""The search against step functions that fail the way devices do (CPU backend, exact texts)."""

import time

import pytest
import torch
from memory_curves import curve_of
from oom_texts import RUNTIME_OOM_TEXTS

from mps_autobatch import NoBatchSizeFits, find_safe_batch_size, plan_accumulation
from mps_autobatch.accumulation import micro_batch_sizes
from mps_autobatch.search import first_batch_size, search


class FailsAbove:
    """A step that runs up to `largest` and raises `error` above it, recording every size it is asked for."""

    def __init__(self, largest, error):
        self.largest = largest
        self.error = error
        self.sizes = []

    def __call__(self, batch_size):
        self.sizes.append(batch_size)
        if batch_size > self.largest:
            raise self.error


@pytest.mark.parametrize(
    "error",
    [RuntimeError(text) for text in RUNTIME_OOM_TEXTS] + [torch.OutOfMemoryError(), MemoryError()],
    ids=lambda e: (str(e) or type(e).__name__)[:30],
)
def test_a_step_failing_above_n_gives_max_batch_size_n(error):
    step = FailsAbove(37, error)
    result = find_safe_batch_size(step, device="cpu", memory_limit="1GiB")
    assert result.max_batch_size == 37
    # A step that allocates nothing gives the counters nothing to go on: crash-driven bisection.
    assert result.strategy == "bisect"
    assert "no memory signal on cpu" in result.note
    assert result.batch_size == int(0.8 * 37)
    assert step.sizes == [2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert [t.outcome for t in result.trials] == ["ok"] * 5 + ["oom"] * 3 + ["ok", "oom", "ok"]


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad shape"),
        RuntimeError(),
        RuntimeError("Expected all tensors to be on the same device"),
    ],
)
def test_non_oom_errors_propagate_as_the_same_object_after_one_call(error):
    step = FailsAbove(0, error)
    with pytest.raises(type(error)) as raised:
        find_safe_batch_size(step, device="cpu", memory_limit="1GiB")
    assert raised.value is error
    assert step.sizes == [2]


@pytest.mark.parametrize(
    ("requested", "multiple_of", "first"),
    [
        (32, 1, 25),  # the 20%-reduction rule: 32 x 0.8 = 25.6
        (32, 8, 24),  # rounded down to the multiple
        (1, 1, 1),  # never 0
        (3, 4, 4),  # never below multiple_of
        (None, 1, 2),  # no request: start small
        (None, 8, 8),
    ],
)
def test_first_trial_follows_the_reduction_rule(requested, multiple_of, first):
    assert first_batch_size(requested, multiple_of) == first
    step = FailsAbove(1000, RuntimeError(RUNTIME_OOM_TEXTS[0]))
    find_safe_batch_size(
        step,
        device="cpu",
        memory_limit="1GiB",
        requested=requested,
        multiple_of=multiple_of,
        max_batch_size=64,
    )
    assert step.sizes[0] == first
    assert all(size % multiple_of == 0 and size > 0 for size in step.sizes)


def test_requested_one_never_probes_zero():
    step = FailsAbove(0, RuntimeError(RUNTIME_OOM_TEXTS[0]))
    with pytest.raises(NoBatchSizeFits, match=r"batch size 1 failed \(MPS backend out of memory") as raised:
        find_safe_batch_size(step, device="cpu", memory_limit="1GiB", requested=1)
    assert step.sizes == [1]
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert [t.outcome for t in raised.value.trials] == ["oom"]


def test_max_batch_size_caps_every_trial():
    step = FailsAbove(10_000, RuntimeError(RUNTIME_OOM_TEXTS[0]))
    result = find_safe_batch_size(step, device="cpu", memory_limit="1GiB", max_batch_size=50)
    assert max(step.sizes) == 50
    assert result.max_batch_size == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requested": 0}, "requested must be >= 1, got 0."),
        ({"requested": -4}, "requested must be >= 1, got -4."),
        ({"headroom": 1.0}, "headroom must be a fraction in [0, 1), got 1.0."),
        ({"headroom": -0.1}, "headroom must be a fraction in [0, 1), got -0.1."),
        ({"multiple_of": 0}, "multiple_of must be >= 1, got 0."),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0."),
        ({"max_batch_size": 4, "multiple_of": 8}, "max_batch_size 4 is below multiple_of 8"),
        ({"steps_per_trial": 0}, "steps_per_trial must be >= 1, got 0."),
        ({"amp": "fp8"}, "Unknown amp 'fp8'. Use None, 'bf16' or 'fp16'."),
        ({"memory_limit": "lots"}, "Cannot read the memory size 'lots'."),
        ({"memory_limit": "1000TiB"}, "is more than this machine's"),
        ({"device": "tpu"}, "Unknown device 'tpu'. Use one of: auto, mps, cuda, cuda:N, cpu."),
    ],
)
def test_bad_arguments_fail_before_any_trial(kwargs, message):
    step = FailsAbove(100, RuntimeError(RUNTIME_OOM_TEXTS[0]))
    with pytest.raises(ValueError) as raised:
        find_safe_batch_size(step, **kwargs)
    assert message in str(raised.value)
    assert step.sizes == []


@pytest.mark.parametrize(
    ("requested", "safe", "plan", "sizes"),
    [
        (32, 24, (16, 2), [16, 16]),
        (50, 24, (17, 3), [17, 17, 16]),  # an uneven last micro-batch
        (16, 24, (16, 1), [16]),
        (7, 1, (1, 7), [1] * 7),
    ],
)
def test_plan_accumulation_reproduces_the_requested_batch_exactly(requested, safe, plan, sizes):
    assert plan_accumulation(requested, safe) == plan
    assert micro_batch_sizes(requested, plan[0]) == sizes
    assert sum(sizes) == requested and max(sizes) <= safe


def test_requested_gives_the_accumulation_plan():
    step = FailsAbove(30, RuntimeError(RUNTIME_OOM_TEXTS[0]))
    result = find_safe_batch_size(step, device="cpu", memory_limit="1GiB", requested=64)
    assert result.batch_size == 24  # 0.8 x 30 in crash-driven mode
    assert result.accumulation == (22, 3)  # 22 + 22 + 20 = 64


class PlateauStep(FailsAbove):
    """Throughput grows with the batch up to `knee` samples, then stays flat: a step takes max(20 ms, 2 ms x size)."""

    def __call__(self, batch_size):
        super().__call__(batch_size)
        time.sleep(max(0.02, 0.002 * batch_size))


def test_throughput_objective_recommends_the_knee_and_keeps_the_memory_answer():
    step = PlateauStep(40, RuntimeError(RUNTIME_OOM_TEXTS[0]))
    result = find_safe_batch_size(step, device="cpu", memory_limit="1GiB", objective="throughput")
    assert result.memory_batch_size == 32  # 80% of the largest size that ran (crash-driven: no memory signal)
    timed = [size for size, _ in result.throughput]
    assert timed == [2, 4, 8, 16, 32]
    rates = dict(result.throughput)
    assert rates[16] == pytest.approx(rates[32], rel=0.05)  # both on the plateau of ~500 samples/s
    assert rates[8] < 0.9 * rates[16]
    assert (result.objective, result.batch_size) == ("throughput", 16)


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match=r"^Unknown objective 'speed'. Use 'memory' or 'throughput'.$"):
        find_safe_batch_size(lambda bs: None, device="cpu", objective="speed")


# --- regressions found by tests/test_search_properties.py -------------------------------------------------------

MiB = 2**20


def test_when_two_samples_do_not_fit_the_warm_up_falls_back_to_one():
    # A model whose step fits at 1 sample and not at 2: the uncounted warm-up at 2 ran out of memory and the
    # search raised (the raw MPS error, then NoBatchSizeFits) instead of recommending 1.
    _, backend, workload = curve_of([64 * MiB, 160 * MiB, 320 * MiB], limit=256 * MiB)
    result = search(workload, backend, backend.limit(), max_batch_size=2)
    assert (workload.warm_ups, workload.sizes) == ([2, 1], [2, 1])
    assert [t.outcome for t in result.trials] == ["oom", "ok"]
    assert (result.batch_size, result.max_batch_size, result.strategy) == (1, 1, "measure")


def test_when_not_even_one_sample_warms_up_no_batch_size_fits():
    _, backend, workload = curve_of([64 * MiB, 300 * MiB, 600 * MiB], limit=256 * MiB)
    with pytest.raises(NoBatchSizeFits, match=r"^No batch size fits in 0.25 GiB: the warm-up step at batch size 1 ran"):
        search(workload, backend, backend.limit(), max_batch_size=2)
    assert (workload.warm_ups, workload.sizes) == ([2, 1], [])


def test_crash_driven_bisection_never_recommends_a_size_measured_over_the_budget():
    # Memory at rest is already over the budget and a step adds nothing the counter resolves: the search fell back
    # to bisection ("the measured peak did not grow") and recommended 1, measured at 200 MiB against 128 MiB.
    _, backend, workload = curve_of([200 * MiB] * 3, limit=256 * MiB)
    with pytest.raises(NoBatchSizeFits, match=r"batch size 1 failed \(its peak of 0.20 GiB is over the budget\)"):
        search(workload, backend, backend.limit(), headroom=0.5, max_batch_size=2)
    assert workload.sizes == [2, 1]


def test_after_a_fall_back_the_recommendation_stays_below_sizes_measured_over_the_budget():
    # 20 MiB a sample up to 99 samples, then one allocator block more (3.8 GiB, over the 3.6 GiB budget) up to 120,
    # then over the limit: the out-of-memory error at 128, where the line said 3.5 GiB, starts crash-driven
    # bisection, which found 120 and recommended 90% of it (108) although it had measured 100 at 3.8 GiB.
    peaks = [2**30 + 20 * MiB * size for size in range(100)] + [int(3.8 * 2**30)] * 21 + [5 * 2**30] * 8
    _, backend, workload = curve_of(peaks, limit=4 * 2**30)
    result = search(workload, backend, backend.limit(), headroom=0.1, max_batch_size=128)
    assert result.note.startswith("Fell back to crash-driven bisection: batch size 128 ran out of memory where")
    assert workload.sizes == [2, 16, 128, 72, 100, 114, 121, 117, 119, 120]
    assert [t.batch_size for t in result.trials if t.ok and not t.fits_budget] == [100, 114, 117, 119, 120]
    assert (result.strategy, result.max_batch_size, result.batch_size) == ("bisect", 120, 72)  # not 108
