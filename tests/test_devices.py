"""Device backends: both MPS peak paths, the repeatable CPU peak, device selection."""

import pytest
import timm
import torch

from mps_autobatch.devices import CPUBackend, MPSBackend, get_backend
from mps_autobatch.simulate import AllocatorModel, SimulatedMPS, SimulatedMPSBackend
from mps_autobatch.workload import make_workload

MiB = 2**20


def _transient_then_small(module):
    """A forward that allocates 32 MiB and frees it inside the module, leaving 4 MiB live."""
    big = torch.ones(8 * MiB)
    del big
    return module(torch.ones(MiB))


@pytest.mark.parametrize("peak_stats", [True, False])
def test_mps_peak_reads_driver_memory_and_the_tensor_peak_where_torch_has_it(peak_stats):
    sim = SimulatedMPS(allocator=AllocatorModel(other_bytes=8 * MiB, reuse_slack_bytes=0), peak_stats=peak_stats)
    backend = SimulatedMPSBackend(sim)
    with backend.session(2**30):
        backend.clear_cache()
        with backend.measure() as window:
            kept = _transient_then_small(torch.nn.Identity())
    # Driver memory keeps the freed 32 MiB in the cache, so the peak is seen on both paths.
    assert window.peak_bytes == 8 * MiB + 32 * MiB + 4 * MiB
    # torch >= 2.13: the allocator's own tensor peak; older torch: live tensors read before and after every op.
    # Both include the transient buffer (read only at module hooks, the older path used to miss it).
    assert window.allocated_bytes == 32 * MiB
    del kept


def test_an_mps_counter_that_reads_zero_is_not_a_measurement():
    class Silent(SimulatedMPS):
        def driver_allocated_memory(self):
            return 0

    backend = SimulatedMPSBackend(Silent(peak_stats=False))
    with backend.session(2**30), backend.measure() as window:
        pass
    assert window.peak_bytes is None


def test_cpu_peak_of_identical_steps_is_repeatable():
    torch.manual_seed(0)
    backend = CPUBackend()
    model = timm.create_model("test_efficientnet", num_classes=10)
    peaks = []
    with make_workload(model, device=backend.device, input_shape=(3, 96, 96)) as workload:
        with backend.session(2**32):
            workload.warm_up(2)
            for _ in range(3):
                backend.clear_cache()
                with backend.measure() as window:
                    workload.step(32)
                peaks.append(window.peak_bytes)
    assert max(peaks) <= 1.05 * min(peaks)
    assert min(peaks) > 50 * MiB  # the step's tensors are counted, not just the process baseline


def test_cpu_default_limit_is_at_most_4gib_or_half_the_available_ram():
    limit = CPUBackend(host_memory=lambda: (64 * 2**30, 32 * 2**30)).limit()
    assert (limit.bytes, limit.source) == (4 * 2**30, "default CPU limit (4 GiB)")
    limit = CPUBackend(host_memory=lambda: (8 * 2**30, 6 * 2**30)).limit()
    assert (limit.bytes, limit.source) == (3 * 2**30, "half of the 6.00 GiB of available RAM")


def test_auto_picks_the_first_available_device():
    expected = "mps" if MPSBackend.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    assert get_backend("auto").name.split(":")[0] == expected


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message on machines without MPS")
def test_an_unavailable_device_is_one_clear_error():
    # The library names its argument, never a CLI flag.
    message = r"^Device 'mps' is not available on this machine \(found: 'cpu'\)\. Use device='auto'\.$"
    with pytest.raises(ValueError, match=message):
        get_backend("mps")
