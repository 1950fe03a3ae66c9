"""The simulated accelerator reproduces the MPS memory API, its allocator's caching and its exact errors."""

import re

import pytest
import torch

from mps_autobatch import find_safe_batch_size, is_oom_error
from mps_autobatch.simulate import AllocatorModel, SimulatedMPS, simulated_backend

KiB, MiB, GiB = 2**10, 2**20, 2**30


def test_buffers_are_rounded_like_mps_allocator():
    sim = SimulatedMPS(allocator=AllocatorModel(other_bytes=0))
    with sim.tracking():
        small = torch.empty(1, dtype=torch.uint8)  # one byte -> one 16 KiB page
        assert sim.current_allocated_memory() == 16 * KiB
        large = torch.empty(3 * MiB // 2, dtype=torch.uint8)  # 1.5 MiB -> 2 MiB
        assert sim.current_allocated_memory() == 16 * KiB + 2 * MiB
    del small, large


def test_freed_buffers_stay_in_driver_memory_until_empty_cache():
    sim = SimulatedMPS(allocator=AllocatorModel(other_bytes=5 * MiB))
    with sim.tracking():
        x = torch.ones(4 * MiB // 4)
        assert (sim.current_allocated_memory(), sim.driver_allocated_memory()) == (4 * MiB, 9 * MiB)
        del x
        assert (sim.current_allocated_memory(), sim.driver_allocated_memory()) == (0, 9 * MiB)
        y = torch.ones(4 * MiB // 4)  # reuses the cached buffer: no new heap
        assert sim.driver_allocated_memory() == 9 * MiB
        del y
        sim.empty_cache()
        assert sim.driver_allocated_memory() == 5 * MiB


def test_of_tensors_made_before_tracking_only_what_lives_on_the_device_counts():
    sim = SimulatedMPS(allocator=AllocatorModel(other_bytes=0))
    host_data = torch.ones(MiB // 4)  # 1 MiB each, made outside
    weights = torch.nn.Parameter(torch.ones(MiB // 4))
    state = torch.zeros(MiB // 4)

    class Table(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.ones(MiB // 4))  # a constant the forward only reads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.table

    table = Table()
    with sim.tracking():
        assert sim.current_allocated_memory() == 0
        read = host_data * 2  # host data a step only reads is not device memory: only the new tensor counts
        assert sim.current_allocated_memory() == 1 * MiB
        scaled = weights * 2  # a parameter is read where it lives, on the device
        assert sim.current_allocated_memory() == 3 * MiB
        state.add_(1)  # what an op writes in place (optimizer state) lives on the device
        assert sim.current_allocated_memory() == 4 * MiB
        looked_up = table(torch.ones(MiB // 4))  # a module that runs: its buffers live there too
        assert sim.current_allocated_memory() == 6 * MiB  # the table and the output (the input is freed)
    del read, scaled, looked_up


def test_over_the_limit_the_cache_is_flushed_once_then_the_exact_mps_error_is_raised():
    sim = SimulatedMPS(16 * GiB, allocator=AllocatorModel(other_bytes=10 * MiB))
    sim.set_per_process_memory_fraction(100 * MiB / sim.recommended_max_memory())
    with sim.tracking():
        keep = torch.ones(60 * MiB // 4)
        cached = torch.ones(20 * MiB // 4)
        del cached
        assert sim.driver_allocated_memory() == 90 * MiB
        fits_after_flush = torch.ones(30 * MiB // 4)  # 90 + 30 > 100: flush the 20 cached, then 100 fits
        assert sim.driver_allocated_memory() == 100 * MiB
        with pytest.raises(RuntimeError) as raised:
            torch.ones(MiB)
    text = str(raised.value)
    assert text == (
        "MPS backend out of memory (MPS allocated: 90.00 MiB, other allocations: 10.00 MiB, max allowed: "
        "100.00 MiB). Tried to allocate 4.00 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to "
        "disable upper limit for memory allocations (may cause system failure)."
    )
    assert type(raised.value) is RuntimeError and is_oom_error(raised.value)
    del keep, fits_after_flush


def test_old_torch_units_and_the_unlimited_variant():
    sim = SimulatedMPS(GiB, units="GB", allocator=AllocatorModel(other_bytes=0))
    sim.set_per_process_memory_fraction(0.0)  # unlimited: only the Mac's memory stops it
    with sim.tracking(), pytest.raises(RuntimeError) as raised:
        torch.empty(GiB + MiB, dtype=torch.uint8)
    assert str(raised.value) == (
        "MPS backend out of memory (MPS allocated: 0 bytes, other allocations: 0 bytes). "
        "Tried to allocate 1.00 GB on private pool."
    )


def test_cuda_text_mode_raises_torch_out_of_memory_error():
    sim = SimulatedMPS(error_style="cuda", allocator=AllocatorModel(other_bytes=0))
    sim.set_per_process_memory_fraction(8 * MiB / sim.recommended_max_memory())
    with (
        sim.tracking(),
        pytest.raises(torch.OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate 16\.00 MiB\."),
    ):
        torch.ones(4 * MiB)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (1, TypeError, "Invalid type for fraction argument, must be `float`"),
        (2.5, ValueError, "Invalid fraction value: 2.5. Allowed range: 0~2"),
        (-0.1, ValueError, "Invalid fraction value: -0.1. Allowed range: 0~2"),
    ],
)
def test_set_per_process_memory_fraction_checks_like_torch(value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SimulatedMPS().set_per_process_memory_fraction(value)


def test_recommended_max_follows_the_mac_size():
    assert SimulatedMPS(16 * GiB).recommended_max_memory() == int(16 * GiB * 2 / 3)
    assert SimulatedMPS(64 * GiB).recommended_max_memory() == 48 * GiB


def test_the_watermark_environment_variable_is_read_like_torch(monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.2")
    assert SimulatedMPS().ratio == 1.2
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "lots")  # strtod reads garbage as 0.0: unlimited
    assert SimulatedMPS().limit_bytes is None


def test_peak_statistics_exist_only_where_torch_has_them():
    sim = SimulatedMPS(peak_stats=False)
    with pytest.raises(RuntimeError, match="Allocator for mps is not a DeviceAllocator"):
        sim.accelerator.max_memory_allocated()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("16GiB", "Cannot read the simulation '16GiB'. Write it as 'mps:16GiB'"),
        ("mps:lots", "Cannot read the memory size 'lots'."),
    ],
)
def test_bad_simulation_specs(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        simulated_backend(spec)


def test_a_simulated_limit_beyond_this_machines_ram_is_refused_for_a_probe_only():
    backend = simulated_backend("mps:512GiB")
    limit = backend.limit()  # describing the Mac needs no RAM
    # The simulated Mac's own RAM (3/4 of 512 GiB free), below its allocator cap of 1.7 x 384 GiB.
    assert limit.bytes == 384 * 2**30 and limit.source.startswith("RAM: 383.94 GiB available + 64.00 MiB held")
    with pytest.raises(ValueError, match=r"^The simulated limit .* is more than this machine's .* of available RAM"):
        backend.check_can_run(limit.bytes)
    with pytest.raises(ValueError, match=r"^The simulated limit .* is more than this machine's .* of available RAM"):
        find_safe_batch_size(lambda b: None, device=backend)
