"""The probe leaves no trace on the simulated Mac, whatever happens: a size that fits, an out-of-memory trial,
an error of the user's step, or Ctrl-C in the middle of a step.

After each, the memory fraction is back where it was, the allocator's cache is empty, nothing is live on the
device but the model itself, and the model and the user's optimizer are bit for bit what they were.
(tests/test_probe_simulated.py checks the fraction while probing, and timm models after an OOM.)
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from mps_autobatch import find_safe_batch_size
from mps_autobatch.devices import MPS_WATERMARK_ENV
from mps_autobatch.simulate import AllocatorModel, SimulatedMPS, SimulatedMPSBackend

IMAGE = (3, 32, 32)


class Net(nn.Module):
    """A small conv net with BatchNorm whose forward raises ``error`` at ``at`` samples or more, mid-forward."""

    def __init__(self, error: type[BaseException] | None = None, at: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(16, 10)
        self.num_classes = 10
        self.error, self.at = error, at
        self.failed_at: int | None = None  # the batch size the error was raised at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.error is not None and x.shape[0] >= self.at:
            self.failed_at = x.shape[0]
            raise self.error("the step failed")  # a new exception each time, as user code raises them
        return self.head(x)


OUTCOMES = {
    # outcome: (error raised by the step, find_safe_batch_size arguments)
    "fits": (None, {"memory_limit": "1GiB", "max_batch_size": 16}),
    "oom": (None, {"memory_limit": "128MiB", "requested": 1000}),  # 800 samples do not fit
    "error": (ValueError, {"memory_limit": "1GiB"}),
    "interrupt": (KeyboardInterrupt, {"memory_limit": "1GiB"}),
}


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    tensors: dict[str, object] = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    tensors |= {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v.clone() for k, v in values.items()}
    tensors["param_groups"] = state["param_groups"]
    return tensors


def _same(before: dict[str, object], after: dict[str, object]) -> bool:
    if before.keys() != after.keys():
        return False
    return all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before.values(), after.values())
    )


def _pages(nbytes: int, page: int) -> int:
    return -(-nbytes // page) * page


def _model_bytes(model: nn.Module, page: int) -> int:
    """What the model's own tensors take on the simulated device: every storage rounded up to a page."""
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(_pages(nbytes, page) for nbytes in storages.values())


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_the_probe_leaves_no_trace(outcome, monkeypatch):
    monkeypatch.delenv(MPS_WATERMARK_ENV, raising=False)
    error, kwargs = OUTCOMES[outcome]
    # A 16 GiB Mac whose allocator reuses a cached buffer for same-sized requests only, so that a tensor's
    # device bytes do not depend on what was cached when it was first used.
    sim = SimulatedMPS(16 * 2**30, allocator=AllocatorModel(reuse_slack_bytes=0))
    backend = SimulatedMPSBackend(sim)
    torch.manual_seed(0)
    model = Net(error)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, *IMAGE)).sum().backward()
    optimizer.step()  # the user's optimizer has state
    model(torch.randn(4, *IMAGE)).sum().backward()  # and the model has gradients
    before, ratio = _snapshot(model, optimizer), sim.ratio
    assert (ratio, sim.current_allocated_memory()) == (1.7, 0)

    if error is None:
        result = find_safe_batch_size(model, input_shape=IMAGE, optimizer=optimizer, device=backend, **kwargs)
        assert ("oom" in {t.outcome for t in result.trials}) == (outcome == "oom")
    else:
        with pytest.raises(error, match="^the step failed$") as raised:
            find_safe_batch_size(model, input_shape=IMAGE, optimizer=optimizer, device=backend, **kwargs)
        del raised
        gc.collect()  # the caller lets go of the error and its traceback

    assert sim.ratio == ratio
    cached = sim.driver_allocated_memory() - sim.current_allocated_memory() - sim.allocator.other_bytes
    # The probe frees what a failed step's frames hold before it empties the cache (2 MiB of activations here).
    # Only the failed call's input batch stays with the traceback, in torch's module-call wrapper (used while the
    # MPS backend's forward hook is set), and lands in the cache when the caller lets go of the error.
    batch = 0 if model.failed_at is None else _pages(model.failed_at * 3 * 32 * 32 * 4, sim.allocator.page_bytes)
    assert (outcome in ("error", "interrupt"), model.failed_at) == (batch > 0, 16 if batch else None)
    assert cached == batch
    assert sim.current_allocated_memory() == _model_bytes(model, sim.allocator.page_bytes)  # only the model
    assert _same(before, _snapshot(model, optimizer))
    assert model.training
