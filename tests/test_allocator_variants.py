"""The simulated allocator's variants, and the high point of a step read on each of them.

Each variant changes one rule of `mps_autobatch.allocator.AllocatorModel`; the probe must not under-read a step's
true high-water mark (which the simulation exposes) on any of them: a trial that fits the budget peaked within it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mps_autobatch import find_safe_batch_size
from mps_autobatch.allocator import CachingAllocator
from mps_autobatch.simulate import (
    ALLOCATOR_VARIANTS,
    AllocatorModel,
    SimulatedMPS,
    SimulatedMPSBackend,
    simulated_backend,
)

MiB = 2**20


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


class _HighWaterBackend(SimulatedMPSBackend):
    """Records the simulation's true high-water mark of driver memory in every measured window."""

    def __init__(self, allocator: AllocatorModel) -> None:
        super().__init__(SimulatedMPS(16 * 2**30, allocator=allocator))
        self.high_waters: list[int] = []

    def measure(self):
        outer = super().measure()

        class _Window:
            def __enter__(inner):
                self.sim.reset_high_water()
                return outer.__enter__()

            def __exit__(inner, *exc):
                suppressed = outer.__exit__(*exc)
                self.high_waters.append(self.sim.high_water_bytes)
                return suppressed

        return _Window()


def _sizes(allocator: AllocatorModel, nbytes: list[int]) -> list[int]:
    books = CachingAllocator(allocator)
    return [books.size_class(n) for n in nbytes]


def test_power_of_two_heaps_round_large_buffers_up_to_a_power_of_two():
    requests = [1000, 3 * MiB, 5 * MiB + 1]
    assert _sizes(AllocatorModel(), requests) == [16 * 1024, 4 * MiB, 6 * MiB]
    assert _sizes(ALLOCATOR_VARIANTS["pow2-heaps"], requests) == [16 * 1024, 4 * MiB, 8 * MiB]


@pytest.mark.parametrize(("variant", "reused"), [("default", True), ("best-fit-2x", False)])
def test_best_fit_reuse_takes_a_cached_buffer_only_up_to_twice_the_request(variant, reused):
    sim = SimulatedMPS(16 * 2**30, allocator=ALLOCATOR_VARIANTS[variant])
    with sim.tracking():
        big = torch.empty(24 * MiB, dtype=torch.uint8)
        del big  # a 24 MiB buffer in the cache
        small = torch.empty(10 * MiB, dtype=torch.uint8)  # within the 32 MiB slack, more than twice 10 MiB
    assert (sim.driver_allocated_memory() - sim.allocator.other_bytes == 24 * MiB) is reused
    del small


def test_graph_memory_grows_with_each_distinct_input_shape_and_survives_empty_cache():
    sim = SimulatedMPS(16 * 2**30, allocator=ALLOCATOR_VARIANTS["graph-per-shape"])
    before = sim.driver_allocated_memory()
    with sim.tracking():
        for rows in (4, 4, 8):
            torch.ones(rows, 16) * 2
    sim.empty_cache()
    grown = sim.driver_allocated_memory() - before
    # mul at two input shapes (the repeat is cached), and ones once: it takes no tensor, so one signature.
    assert grown == 3 * 64 * 1024


def test_flush_at_90_percent_releases_the_cache_before_growing_past_it():
    sim = SimulatedMPS(16 * 2**30, allocator=ALLOCATOR_VARIANTS["flush-at-90"])
    sim.set_per_process_memory_fraction(float(200 * MiB / sim.recommended_max_bytes))
    limit = sim.limit_bytes
    with sim.tracking():
        cached = torch.empty(60 * MiB, dtype=torch.uint8)
        del cached
        keep = torch.empty(64 * MiB, dtype=torch.uint8)  # 64 + 60 cached + 64 other: 188 MiB, past 90% of 200
    assert (sim.flushes, sim.driver_allocated_memory()) == (1, 128 * MiB)
    assert sim.high_water_bytes == 128 * MiB < 0.9 * limit  # driver memory never went past 124 + 4 MiB
    del keep


def test_a_spec_names_the_variant_and_an_unknown_one_is_refused():
    assert simulated_backend("mps:8GiB:best-fit-2x").sim.allocator == ALLOCATOR_VARIANTS["best-fit-2x"]
    assert simulated_backend("mps:8GiB").sim.allocator == AllocatorModel()
    with pytest.raises(
        ValueError,
        match=r"^Unknown allocator variant 'lru' in the simulation 'mps:8GiB:lru'. Use one of: default, "
        r"best-fit-2x, pow2-heaps, graph-per-shape, flush-at-90.$",
    ):
        simulated_backend("mps:8GiB:lru")


@pytest.mark.parametrize("variant", list(ALLOCATOR_VARIANTS))
def test_no_trial_that_fits_the_budget_peaked_over_it(variant):
    backend = _HighWaterBackend(ALLOCATOR_VARIANTS[variant])
    result = find_safe_batch_size(
        _mlp(), input_shape=(256,), num_classes=10, device=backend, memory_limit=256 * MiB, cache=False
    )
    high_waters = backend.high_waters[-len(result.trials) :]  # the trials' windows come last
    for trial, high in zip(result.trials, high_waters):
        if trial.fits_budget:
            assert high <= result.budget_bytes, (variant, trial.batch_size, high / MiB)
    assert result.batch_size in [t.batch_size for t in result.trials if t.fits_budget]


@pytest.mark.parametrize(("variant", "flushed"), [("default", False), ("flush-at-90", True)])
def test_a_flush_inside_the_window_is_seen(variant, flushed):
    backend = SimulatedMPSBackend(SimulatedMPS(16 * 2**30, allocator=ALLOCATOR_VARIANTS[variant]))
    with backend.session(150 * MiB):
        backend.clear_cache()
        with backend.measure() as window:
            cached = torch.empty(60 * MiB, dtype=torch.uint8)
            del cached  # 60 MiB cached: driver memory 124 MiB with the 64 MiB of other allocations
            kept = torch.empty(20 * MiB, dtype=torch.uint8)  # 144 MiB: past 90 % of 150, not past 150
        del kept
    assert window.flushed is flushed
    assert window.peak_bytes == (144 if not flushed else 124) * MiB
