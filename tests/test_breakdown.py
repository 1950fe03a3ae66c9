"""`ProbeResult.breakdown`: where the peak at the recommended size goes, exact where it can be, and shown."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mps_autobatch import find_safe_batch_size
from mps_autobatch.breakdown import tensor_bytes
from mps_autobatch.cache import result_from_dict
from mps_autobatch.cli import app
from mps_autobatch.policy import tensor_line
from mps_autobatch.simulate import simulated_backend

MiB = 2**20


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))


def _exact_bytes(model: nn.Module) -> tuple[int, int]:
    return sum(p.numel() * 4 for p in model.parameters()), sum(b.numel() * b.element_size() for b in model.buffers())


def test_the_model_and_optimizer_parts_are_exact_and_the_rows_add_up_to_the_peak():
    model = _mlp()
    params, buffers = _exact_bytes(model)
    result = find_safe_batch_size(
        model,
        input_shape=(3, 16, 16),
        num_classes=10,
        device=simulated_backend("mps:16GiB"),
        memory_limit=256 * MiB,
        cache=False,
    )
    parts = result.breakdown
    assert parts is not None and parts.batch_size == result.batch_size
    assert (parts.parameters_bytes, parts.gradients_bytes, parts.buffers_bytes) == (params, params, buffers)
    # AdamW: two moments per parameter and one step counter (a float32 scalar) per parameter tensor.
    assert parts.optimizer_state_bytes == 2 * params + 4 * len(list(model.parameters()))
    chosen = [t for t in result.trials if t.ok and t.batch_size == result.batch_size][-1]
    assert parts.peak_bytes == chosen.peak_bytes
    assert parts.overhead_bytes == chosen.peak_bytes - chosen.allocated_bytes > 64 * MiB  # Metal's share at least
    assert sum(size for _, size in parts.rows()) == parts.peak_bytes
    fits = [t for t in result.trials if t.fits_budget]
    from mps_autobatch.policy import Point

    line = tensor_line([Point(t.batch_size, True, t.peak_bytes, t.allocated_bytes) for t in fits])
    assert parts.activations_per_sample_bytes == int(line[1])
    state = parts.parameters_bytes + parts.gradients_bytes + parts.optimizer_state_bytes + parts.buffers_bytes
    # At the peak (inside backward) not every gradient exists yet: activations get what the tensor peak leaves.
    room = chosen.allocated_bytes - state
    assert parts.activations_bytes == min(parts.activations_per_sample_bytes * result.batch_size, room)
    assert parts.other_tensors_bytes == room - parts.activations_bytes >= 0


def test_on_the_cpu_there_is_no_overhead_and_evaluation_has_no_gradients_or_optimizer_state():
    model = _mlp()
    params, _ = _exact_bytes(model)
    train = find_safe_batch_size(
        model, input_shape=(3, 16, 16), num_classes=10, device="cpu", memory_limit=64 * MiB, cache=False
    )
    assert train.breakdown.overhead_bytes == 0
    evaluation = find_safe_batch_size(
        model, input_shape=(3, 16, 16), num_classes=10, device="cpu", memory_limit=64 * MiB, cache=False, mode="eval"
    )
    parts = evaluation.breakdown
    assert (parts.parameters_bytes, parts.gradients_bytes, parts.optimizer_state_bytes) == (params, 0, 0)


def test_a_step_function_gets_a_breakdown_only_when_it_names_its_model():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(batch_size: int) -> None:
        loss = nn.functional.cross_entropy(model(torch.randn(batch_size, 3, 16, 16)), torch.randint(10, (batch_size,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    bare = find_safe_batch_size(step, device="cpu", memory_limit=64 * MiB, cache=False, max_batch_size=256)
    assert bare.breakdown is None
    named = find_safe_batch_size(
        step, model=model, optimizer=optimizer, device="cpu", memory_limit=64 * MiB, cache=False, max_batch_size=256
    )
    params, _ = _exact_bytes(model)
    assert named.breakdown.optimizer_state_bytes == params  # SGD with momentum: one buffer per parameter


def test_tied_weights_count_once():
    shared = torch.zeros(100, 10)
    assert tensor_bytes([shared, shared.t(), shared[:5]]) == 4000
    assert tensor_bytes([shared, torch.zeros(10)]) == 4040


def test_the_breakdown_survives_the_cache_and_json(tmp_path):
    result = find_safe_batch_size(
        _mlp(), input_shape=(3, 16, 16), num_classes=10, device="cpu", memory_limit=64 * MiB, cache=False
    )
    assert result_from_dict(json.loads(json.dumps(result.to_dict()))) == result


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_probe_breakdown_prints_the_parts_and_json_carries_them(cache_dir):
    runner = CliRunner()
    args = [
        "probe",
        "--model",
        "test_efficientnet",
        "--image-size",
        "32",
        "--num-classes",
        "10",
        "--simulate",
        "mps:16GiB",
        "--memory-limit",
        "256MiB",
    ]
    shown = runner.invoke(app, [*args, "--breakdown"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    parts = data["breakdown"]
    assert parts["batch_size"] == data["batch_size"] == int(shown.stdout)
    assert (
        sum(parts[k] for k in parts if k.endswith("_bytes") and k not in ("peak_bytes", "activations_per_sample_bytes"))
        == parts["peak_bytes"]
    )
    text = shown.stderr
    assert f"Memory at batch size {data['batch_size']} on sim-mps" in text
    for label in ("parameters", "gradients", "optimizer state", "activations", "allocator and driver"):
        assert label in text
    assert f"{parts['peak_bytes'] / MiB:.1f}" in text
