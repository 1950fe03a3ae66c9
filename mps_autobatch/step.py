"""One training step, defined once: what the probe measures, what the estimate traces and what the trainer runs.

A step is: forward under autocast, the loss, backward (scaled by a GradScaler when there is one), the
optimizer step, ``zero_grad(set_to_none=True)``. `TrainingStep` holds those pieces; the probe's module
workload calls it on synthetic batches, `mps_autobatch.estimate` on fake tensors, and the bundled trainer
splits it (`TrainingStep.loss` and `TrainingStep.backward` per micro-batch, `TrainingStep.update` once per
optimisation batch). `Rewind` puts back what a failed step moved: BatchNorm running statistics and the
random-number generators.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss())
    >>> loss = step(torch.randn(8, 4), torch.randint(3, (8,)))
    >>> loss.shape, model.weight.grad is None
    (torch.Size([]), True)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .inputs import call_model, loss_of, to_device

__all__ = [
    "AMP_DTYPES",
    "Amp",
    "Rewind",
    "TrainingStep",
    "autocast",
    "evaluation_output",
    "fork_rng",
    "rng_state",
    "set_rng_state",
]

Amp = Literal["bf16", "fp16"]

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtypes by the names the API and the CLI use."""


def autocast(device: torch.device, amp: str | None) -> AbstractContextManager[Any]:
    """Autocast to ``amp``'s dtype on ``device``'s type, or nothing for full precision.

    Example:
        >>> with autocast(torch.device("cpu"), "bf16"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else nullcontext()


@dataclass
class TrainingStep:
    """One training step of ``model``: ``step(inputs, targets)`` or ``step(batch)``, or its pieces for accumulation.

    ``inputs`` reach the model by `mps_autobatch.inputs.call_model` (``model(*inputs)`` for a tuple); a dict
    batch with no targets is ``model(**batch)``, its loss ``loss_fn(output, batch)`` or the output's ``.loss``.

    Args:
        model: what the forward runs (the module itself, or its DistributedDataParallel wrapper).
        optimizer: stepped once per update.
        loss_fn: ``loss_fn(output, targets)`` (``loss_fn(output, batch)`` for a dict batch); None for
            cross-entropy, or the output's own loss for a dict batch.
        amp: None, "bf16" or "fp16" autocast.
        scaler: a GradScaler for fp16, or None.
        channels_last: feed image batches (4-D) in the channels-last memory format.
        device: where inputs and targets are moved before the forward, and whose autocast applies.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    amp: str | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def loss(self, inputs: Any, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The forward and the loss of one (micro-)batch, under autocast; ``targets`` None for a dict batch."""
        inputs = _on_device(inputs, self.device, self.channels_last)
        with autocast(self.device, self.amp):
            output = call_model(self.model, inputs)
            if targets is None and isinstance(inputs, Mapping):
                return loss_of(output, inputs, self.loss_fn)
            if targets is None:
                raise TypeError("TrainingStep.loss needs targets unless the batch is a dict that holds them.")
            loss_fn = self.loss_fn if self.loss_fn is not None else nn.functional.cross_entropy
            return loss_fn(output, targets.to(self.device, non_blocking=True))

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through ``loss``, scaled when a GradScaler is in use."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self) -> None:
        """The optimizer step (through the scaler when there is one), then free the gradients."""
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # Free the gradients' memory before the next forward.
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, inputs: Any, targets: torch.Tensor | None = None) -> torch.Tensor:
        """A whole step on one batch; returns the loss, detached."""
        loss = self.loss(inputs, targets)
        self.backward(loss)
        self.update()
        return loss.detach()


def _on_device(inputs: Any, device: torch.device, channels_last: bool) -> Any:
    inputs = to_device(inputs, device)
    if channels_last and isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def evaluation_output(
    model: nn.Module, inputs: Any, *, device: torch.device, amp: str | None = None, channels_last: bool = False
) -> Any:
    """The forward of one evaluation batch: moved to ``device``, under autocast and ``torch.inference_mode``.

    What the eval probe measures and what the trainer's evaluation runs; the caller puts the model in eval mode.

    Example:
        >>> out = evaluation_output(nn.Linear(4, 2).eval(), torch.ones(3, 4), device=torch.device("cpu"))
        >>> tuple(out.shape), out.requires_grad
        ((3, 2), False)
    """
    with torch.inference_mode(), autocast(device, amp):
        return call_model(model, _on_device(inputs, device, channels_last))


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random-number state a training step reads: Python, numpy, torch CPU and the device's.

    Example:
        >>> sorted(rng_state(torch.device("cpu")))
        ['numpy', 'python', 'torch']
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    rng = _device_rng(device)
    if rng is not None:
        state[device.type] = rng.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `rng_state` returned (the device's state only on the same kind of device)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    rng = _device_rng(device)
    if rng is not None and device.type in state:
        rng.set_rng_state(state[device.type])


def fork_rng(device: torch.device) -> AbstractContextManager[None]:
    """Put every generator a step draws from back when the block ends: torch's CPU one and the device's.

    Example:
        >>> with fork_rng(torch.device("cpu")):
        ...     _ = torch.rand(1)
    """
    return torch.random.fork_rng(devices=[] if _device_rng(device) is None else None, device_type=device.type)


def _device_rng(device: torch.device) -> Any:
    """The device's own generator module (torch.cuda, torch.mps), or None where torch's CPU one is all."""
    module = torch.get_device_module(device.type)
    return module if hasattr(module, "get_rng_state") else None


class Rewind:
    """What a failed step moved, captured before it: BatchNorm running statistics and the RNGs.

    A step that runs out of memory has already updated BatchNorm's running mean and variance in its
    forward and drawn random numbers (dropout, augmentation); re-running the same batch after `restore`
    computes what a run without the failure would have.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> rewind = Rewind(bn, torch.device("cpu"))
        >>> _ = bn(torch.randn(4, 2) + 5); rewind.restore()
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
        self._device = device
        self._norm_stats = [(buffer, buffer.detach().clone()) for m in norms for buffer in m.buffers(recurse=False)]
        self._rng = rng_state(device)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the statistics and the random-number states back as they were when captured."""
        # A copy into existing buffers allocates nothing on a device; keep trackers (the simulation, the
        # CPU backend) from booking the saved copy as device memory.
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            for buffer, value in self._norm_stats:
                buffer.copy_(value)
        set_rng_state(self._rng, self._device)
