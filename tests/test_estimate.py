"""The fake-tensor estimate against a real CPU step, its growth with batch and image size, its errors."""

import re

import pytest
import timm
import torch
from torch import nn

from mps_autobatch.estimate import Estimate, estimate_grid, estimate_peak, measure_peak

MB = 10**6


def _resnet18() -> nn.Module:
    return timm.create_model("resnet18", num_classes=10, pretrained=False)


def test_estimate_matches_the_measured_peak_of_a_real_step() -> None:
    torch.manual_seed(0)
    model = _resnet18()
    shape, batch_size = (3, 96, 96), 64
    measured = measure_peak(model, input_shape=shape, batch_size=batch_size, num_classes=10)
    from_factory = estimate_peak(_resnet18, input_shape=shape, batch_size=batch_size, num_classes=10)
    from_instance = estimate_peak(model, input_shape=shape, batch_size=batch_size, num_classes=10)
    estimated = from_factory.peak_bytes
    print(f"resnet18 {shape} batch {batch_size}: measured {measured} B, estimated {estimated} B")
    assert measured >= 200 * MB
    assert from_instance == from_factory == Estimate(batch_size, shape, estimated)
    assert abs(estimated - measured) / measured < 0.10


def test_estimate_leaves_the_callers_model_and_rng_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    estimate_peak(model, input_shape=(3, 8, 8), batch_size=4, num_classes=5, optimizer="sgd", amp="bf16")
    assert not model.training
    assert all(param.grad is None for param in model.parameters())
    assert all(not isinstance(value, torch._subclasses.FakeTensor) for value in model.state_dict().values())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


def test_estimates_grow_with_batch_and_image_size() -> None:
    grid = estimate_grid(
        lambda: timm.create_model("test_efficientnet", num_classes=10, pretrained=False),
        input_shapes=[(3, 224, 224), (3, 1024, 1024)],
        batch_sizes=[2, 4],
        num_classes=10,
    )
    assert [(e.input_shape[-1], e.batch_size) for e in grid] == [(224, 2), (224, 4), (1024, 2), (1024, 4)]
    small_2, small_4, large_2, large_4 = (e.peak_bytes for e in grid)
    assert small_2 < small_4
    assert large_2 < large_4
    assert large_2 > 10 * small_2
    assert large_4 > 10 * small_4


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # sizes
        ({"batch_size": 0}, "batch_size must be >= 1, got 0. Pass a positive batch_size."),
        ({"batch_size": -3}, "batch_size must be >= 1, got -3. Pass a positive batch_size."),
        (
            {"input_shape": ()},
            "input_shape must be the positive sizes of one sample, got (). Pass e.g. input_shape=(3, 224, 224).",
        ),
        (
            {"input_shape": (3, 0, 2)},
            "input_shape must be the positive sizes of one sample, got (3, 0, 2). Pass e.g. input_shape=(3, 224, 224).",
        ),
        ({"num_classes": 0}, "num_classes must be >= 1, got 0. Pass the classifier's output size."),
        # names
        ({"optimizer": "lamb"}, "Unknown optimizer 'lamb'. Use one of: adamw, adam, sgd."),
        ({"amp": "fp8"}, "Unknown amp 'fp8'. Use None, 'bf16' or 'fp16'."),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs: dict, message: str) -> None:
    args = {"input_shape": (3, 2, 2), "batch_size": 2, "num_classes": 4, **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        estimate_peak(_tiny, **args)


def test_grid_checks_every_batch_size() -> None:
    with pytest.raises(ValueError, match=re.escape("batch_size must be >= 1, got 0.")):
        estimate_grid(_tiny, input_shapes=[(3, 2, 2)], batch_sizes=[4, 0], num_classes=4)


class _ReadsATensorValue(nn.Module):
    """Like timm's drop-path schedules: the constructor calls .item(), which fake tensors cannot answer."""

    def __init__(self) -> None:
        super().__init__()
        self.rate = torch.linspace(0, 0.1, 3)[1].item()
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_factory_whose_constructor_reads_tensor_values_is_still_estimated() -> None:
    estimate = estimate_peak(_ReadsATensorValue, input_shape=(3, 2, 2), batch_size=8, num_classes=4)
    measured = measure_peak(_ReadsATensorValue(), input_shape=(3, 2, 2), batch_size=8, num_classes=4)
    assert estimate.peak_bytes == measured


def _small_convnet() -> nn.Module:
    return timm.create_model("test_efficientnet", num_classes=10, pretrained=False)


def _measured_on(backend, sizes, shape=(3, 64, 64)) -> list[int]:
    from mps_autobatch.estimate import measure_device_peaks

    return measure_device_peaks(_small_convnet, backend, input_shape=shape, batch_sizes=sizes, num_classes=10)


def test_calibrated_on_a_mac_the_replay_predicts_its_peak_at_4x_and_8x() -> None:
    from mps_autobatch.estimate import calibrate
    from mps_autobatch.simulate import simulated_backend

    backend = simulated_backend("mps:16GiB")
    line = calibrate(_small_convnet, backend, input_shape=(3, 64, 64), batch_size=4, num_classes=10)
    assert line.allocator == backend.allocator_rules and line.sizes == (4, 8)
    grid = estimate_grid(
        _small_convnet, input_shapes=[(3, 64, 64)], batch_sizes=[16, 32], num_classes=10, allocator=line.allocator
    )
    measured = _measured_on(backend, [16, 32])
    errors = [line.predict(e) / m - 1 for e, m in zip(grid, measured)]
    tensors_only = [(e.peak_bytes + line.fixed_bytes) / m - 1 for e, m in zip(grid, measured)]
    print(f"calibrated errors {errors}, tensors + the same fixed amount {tensors_only}")
    # The simulated Mac's allocator has the rules the replay uses: what is left is its 64 MiB of other allocations.
    assert abs(line.fixed_bytes - 64 * 2**20) < 2 * 2**20 and abs(line.per_sample_bytes) < 0.05 * 2**20
    assert all(abs(error) < 0.01 for error in errors)
    assert all(error < -0.05 for error in tensors_only)  # rounding and cache: what tensors alone leave out


def test_calibration_starts_from_an_empty_cache_and_leaves_none_behind() -> None:
    from mps_autobatch.estimate import calibrate
    from mps_autobatch.simulate import simulated_backend

    fresh = calibrate(_small_convnet, simulated_backend("mps:16GiB"), input_shape=(3, 64, 64), batch_size=4,
                      num_classes=10)  # fmt: skip
    backend = simulated_backend("mps:16GiB")
    with backend.sim.tracking():
        leftovers = [torch.empty(n * 2**18) for n in range(1, 40)]  # earlier work's buffers, freed into the cache
    del leftovers
    after_work = calibrate(_small_convnet, backend, input_shape=(3, 64, 64), batch_size=4, num_classes=10)
    assert after_work.measured_bytes == fresh.measured_bytes
    sim = backend.sim  # beyond what is still live, only Metal's other allocations: no cached buffers
    assert sim.driver_allocated_memory() - sim.current_allocated_memory() == 64 * 2**20


def test_a_calibration_refuses_an_estimate_traced_without_its_allocator_rules() -> None:
    from mps_autobatch.allocator import MPS_ALLOCATOR
    from mps_autobatch.estimate import Calibration

    line = Calibration(0, 0.0, (4, 8), (10, 20), (5, 10), (4, 8), allocator=MPS_ALLOCATOR)
    tensors_only = estimate_peak(_small_convnet, input_shape=(3, 32, 32), batch_size=2, num_classes=10)
    with pytest.raises(ValueError) as error:
        line.predict(tensors_only)
    assert str(error.value) == (
        "The estimate and the calibration model the device differently: trace the estimate with "
        "allocator=calibration.allocator."
    )


def test_on_the_cpu_there_are_no_allocator_rules_and_the_tensors_are_the_peak() -> None:
    from mps_autobatch.devices import CPUBackend
    from mps_autobatch.estimate import calibrate

    line = calibrate(_small_convnet, CPUBackend(), input_shape=(3, 32, 32), batch_size=4, num_classes=10)
    assert line.allocator is None
    assert line.modelled_bytes == tuple(
        e.peak_bytes
        for e in estimate_grid(_small_convnet, input_shapes=[(3, 32, 32)], batch_sizes=[4, 8], num_classes=10)
    )
    # The CPU backend counts live tensor bytes storage by storage: nothing beyond the dry run's tensors.
    assert (line.fixed_bytes, line.per_sample_bytes) == (0, 0.0)
