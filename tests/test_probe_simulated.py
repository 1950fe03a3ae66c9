"""find_safe_batch_size on the simulated Mac, against the truth found by stepping every size."""

import functools
import math

import pytest
import timm
import torch

from mps_autobatch import find_safe_batch_size
from mps_autobatch.simulate import AllocatorModel, SimulatedMPS, SimulatedMPSBackend
from mps_autobatch.workload import make_workload

MiB = 2**20
IMAGE = (3, 64, 64)
SETTINGS = {
    # MPSAllocator.h's constants, torch >= 2.13 (peak statistics available).
    "mps-defaults": dict(allocator=AllocatorModel(), peak_stats=True),
    # Other rounding, no oversize reuse, fewer "other allocations", and no peak statistics (torch < 2.13).
    "other-allocator": dict(
        allocator=AllocatorModel(page_bytes=4096, large_round_bytes=MiB, reuse_slack_bytes=0, other_bytes=24 * MiB),
        peak_stats=False,
    ),
}
MODELS = ["test_efficientnet", "test_resnet"]  # both with BatchNorm
BUDGETS_ABOVE_IDLE = [20 * MiB, 40 * MiB]  # room for roughly 10-30 samples at 64 px within the budget


def _model(name):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10)


def _backend(setting):
    return SimulatedMPSBackend(SimulatedMPS(**SETTINGS[setting]))


@functools.cache
def _truth(setting, model_name, limit):
    """Step every size from 2 up, exactly as one trial does, until three sizes in a row fail."""
    backend = _backend(setting)
    budget = int(limit * 0.8)
    outcomes = {}
    with make_workload(_model(model_name), device=backend.device, input_shape=IMAGE) as workload:
        with backend.session(limit):
            backend.clear_cache()
            workload.warm_up(2)
            size, failures = 2, 0
            while failures < 3:
                backend.clear_cache()
                try:
                    with backend.measure() as window:
                        workload.step(size)
                    outcomes[size] = window.peak_bytes
                    failures = 0
                except RuntimeError as exc:
                    assert "MPS backend out of memory" in str(exc)
                    outcomes[size] = None
                    failures += 1
                if outcomes[size] is None:
                    workload.recover()
                    backend.release_failed_step()
                size += 1
    max_truth = max(size for size, peak in outcomes.items() if peak is not None)
    budget_truth = max(size for size, peak in outcomes.items() if peak is not None and peak <= budget)
    return max_truth, budget_truth


def _limit(setting, model_name, extra):
    """A limit whose budget (80%) is `extra` above what the model and optimizer state take at rest."""
    backend = _backend(setting)
    with make_workload(_model(model_name), device=backend.device, input_shape=IMAGE) as workload:
        with backend.session(2**40):
            backend.clear_cache()
            workload.warm_up(2)
            backend.clear_cache()
            idle = backend.sim.driver_allocated_memory()
    return int((idle + extra) / 0.8)


# Every (setting, model) pair once, each budget with each setting and each model (a Latin square: half the
# full grid's time, which the suite's 10-minute bound needs, and no value left untried with another).
CASES = [
    (setting, model, BUDGETS_ABOVE_IDLE[(i + j) % 2])
    for i, setting in enumerate(SETTINGS)
    for j, model in enumerate(MODELS)
]


@pytest.mark.parametrize(("setting", "model_name", "extra"), CASES)
def test_find_max_is_exactly_the_largest_size_that_runs(setting, model_name, extra):
    limit = _limit(setting, model_name, extra)
    max_truth, _ = _truth(setting, model_name, limit)
    result = find_safe_batch_size(
        _model(model_name), input_shape=IMAGE, device=_backend(setting), memory_limit=limit, find_max=True
    )
    assert result.max_batch_size == max_truth
    assert 10 <= max_truth <= 120  # the case is what it claims to be


@pytest.mark.parametrize(("setting", "model_name", "extra"), CASES)
def test_recommended_size_is_near_the_budget_truth_and_its_peak_fits(setting, model_name, extra):
    limit = _limit(setting, model_name, extra)
    _, budget_truth = _truth(setting, model_name, limit)
    result = find_safe_batch_size(_model(model_name), input_shape=IMAGE, device=_backend(setting), memory_limit=limit)
    chosen = next(t for t in result.trials if t.batch_size == result.batch_size)
    assert chosen.peak_bytes <= result.budget_bytes == int(limit * 0.8)
    assert budget_truth >= result.batch_size >= 0.95 * budget_truth
    assert result.strategy == "measure"
    assert len(result.trials) <= math.ceil(math.log2(budget_truth)) + 4


def test_the_fraction_is_set_while_probing_and_restored_after(monkeypatch):
    backend = _backend("mps-defaults")
    sim = backend.sim
    seen = []
    model = _model("test_efficientnet")
    result = find_safe_batch_size(
        model,
        input_shape=IMAGE,
        device=backend,
        memory_limit="1GiB",
        max_batch_size=8,
        on_trial=lambda trial: seen.append(sim.ratio),
    )
    assert seen and set(seen) == {2**30 / sim.recommended_max_memory()}
    assert sim.ratio == 1.7  # back to torch's default: there is no getter to remember another value
    assert result.limit_bytes == 2**30 and result.limit_source == "memory_limit"
    assert sim.driver_allocated_memory() - sim.current_allocated_memory() == sim.allocator.other_bytes  # cache emptied


@pytest.mark.parametrize("error", [ValueError("user bug"), KeyboardInterrupt()])
def test_the_fraction_is_restored_when_the_step_raises(monkeypatch, error):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "1.3")
    backend = _backend("mps-defaults")
    sim = backend.sim
    ratios = []

    def step(batch_size):
        ratios.append(sim.ratio)
        raise error

    with pytest.raises(type(error)):
        find_safe_batch_size(step, device=backend, memory_limit="1GiB")
    assert ratios == [2**30 / sim.recommended_max_memory()]
    assert sim.ratio == 1.3  # restored to the environment's value


def test_an_unreadable_watermark_environment_variable_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "lots")
    with pytest.raises(
        ValueError, match=r"^PYTORCH_MPS_HIGH_WATERMARK_RATIO='lots' is not a ratio between 0.0 and 2.0"
    ):
        find_safe_batch_size(lambda bs: None, device=_backend("mps-defaults"))


def test_default_limit_is_the_allocator_cap_or_what_ram_holds():
    backend = _backend("mps-defaults")  # 16 GiB Mac: 1.7 x 10.67 GiB is above RAM, so RAM decides
    limit = backend.limit()
    total, available = backend.sim.host_memory()
    assert limit.bytes == available + backend.sim.driver_allocated_memory() == 12 * 2**30
    assert limit.source.startswith("RAM: 11.94 GiB available + 64.00 MiB held by this process")


def _state(model, optimizer):
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    tensors |= {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for i, state in optimizer.state.items() if False else enumerate(optimizer.state.values()):
        tensors |= {f"opt.{i}.{k}": v.clone() for k, v in state.items()}
    return tensors


def test_parameters_buffers_grads_and_optimizer_state_are_bit_identical_after_an_oom():
    model = _model("test_efficientnet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, *IMAGE)).sum().backward()
    optimizer.step()  # the user's optimizer already has state
    model(torch.randn(4, *IMAGE)).sum().backward()  # and there are gradients
    limit = _limit("mps-defaults", "test_efficientnet", 40 * MiB)
    before = _state(model, optimizer)
    rng = torch.get_rng_state()
    result = find_safe_batch_size(
        model,
        input_shape=IMAGE,
        optimizer=optimizer,
        device=_backend("mps-defaults"),
        memory_limit=limit,
        requested=200,
    )
    assert result.trials[0].outcome == "oom"  # 80% of 200 does not fit
    after = _state(model, optimizer)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training
