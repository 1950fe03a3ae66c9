"""Where a probe's memory goes: the model's and optimizer's exact bytes, activations, and the overhead on top.

Parameters, gradients, optimizer state and buffers are counted from the tensors themselves (each storage
once, so tied weights count once); activations come from the slope of the tensor peak over the sizes that
fit (tensor bytes grow almost exactly linearly with the batch); the allocator's and driver's overhead is
the measured peak minus the tensor peak at the recommended size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import policy
from .results import MemoryBreakdown, ProbeResult

__all__ = ["memory_breakdown", "tensor_bytes"]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by two tensors counts once).

    Example:
        >>> w = torch.zeros(10, 10)
        >>> tensor_bytes([w, w.t(), torch.zeros(5)])
        420
    """
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def _optimizer_state(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


def memory_breakdown(
    result: ProbeResult, model: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> MemoryBreakdown | None:
    """The peak of the trial at ``result.batch_size``, split into what holds it; None without a model or peak.

    Call it while the probe's optimizer state exists (inside the workload), with the model that ran.

    Example:
        >>> from mps_autobatch import find_safe_batch_size
        >>> model = nn.Linear(64, 4)
        >>> result = find_safe_batch_size(model, input_shape=(64,), num_classes=4, device="cpu",
        ...                               memory_limit=2**20, cache=False)
        >>> result.breakdown.parameters_bytes, result.breakdown.optimizer_state_bytes
        (1040, 2088)
    """
    trial = next((t for t in reversed(result.trials) if t.ok and t.batch_size == result.batch_size), None)
    if model is None or trial is None or trial.peak_bytes is None:
        return None
    parameters = list(model.parameters())
    state = _optimizer_state(optimizer)
    fixed = {
        "parameters_bytes": tensor_bytes(parameters),
        "gradients_bytes": tensor_bytes(p for p in parameters if p.requires_grad) if result.mode == "train" else 0,
        "optimizer_state_bytes": tensor_bytes(state),
        "buffers_bytes": tensor_bytes(model.buffers()),
    }
    tensor_peak = trial.allocated_bytes if trial.allocated_bytes is not None else trial.peak_bytes
    points = [policy.Point(t.batch_size, t.ok, t.peak_bytes, t.allocated_bytes) for t in result.trials if t.fits_budget]
    line = policy.tensor_line(points)
    per_sample = int(line[1]) if line is not None else None
    room = max(tensor_peak - sum(fixed.values()), 0)
    activations = min(per_sample * result.batch_size, room) if per_sample is not None else 0
    return MemoryBreakdown(
        batch_size=result.batch_size,
        **fixed,
        activations_per_sample_bytes=per_sample,
        activations_bytes=activations,
        other_tensors_bytes=tensor_peak - sum(fixed.values()) - activations,
        overhead_bytes=trial.peak_bytes - tensor_peak,
        peak_bytes=trial.peak_bytes,
    )
