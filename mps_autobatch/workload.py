"""Turn what the user has into the `Workload` the search runs: a model, or a step function.

For a model, each step is a real training step on a synthetic batch of the given input shape
(forward, loss, backward, optimizer step, ``zero_grad(set_to_none=True)``), with the user's AMP and
memory-format settings. The model's parameters, buffers, gradients, the optimizer's state and the RNG
are saved to host memory first (never a second copy on the device, which would distort what is
measured) and put back bit for bit afterwards, whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from types import TracebackType
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

__all__ = ["OPTIMIZERS", "CallableWorkload", "ModuleWorkload", "OptimizerSpec", "make_workload"]

OptimizerSpec = str | torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}
"""Optimizers by name. Their state (two moments for Adam, a momentum buffer for SGD) is part of the peak."""

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


class CallableWorkload:
    """A user's own ``step(batch_size)``: called for recorded trials only, nothing saved or restored."""

    def __init__(self, step: Callable[[int], object]) -> None:
        self._step = step

    def __enter__(self) -> CallableWorkload:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def warm_up(self, batch_size: int) -> None:
        """A step function's state is its own: nothing to prepare."""

    def step(self, batch_size: int) -> None:
        self._step(batch_size)

    def recover(self) -> None:
        """Nothing to undo that the step function does not own."""


class ModuleWorkload:
    """Training steps of ``model`` on synthetic batches, on ``device``; a context manager that restores.

    Args:
        model: the module; moved to ``device`` while probing and back afterwards.
        input_shape: the shape of one sample, e.g. ``(3, 224, 224)``.
        num_classes: classes for the synthetic targets (default: ``model.num_classes``, as timm sets it).
        loss_fn: ``loss_fn(output, target)``; default cross-entropy.
        optimizer: a name from `OPTIMIZERS`, an optimizer over the model's parameters, or a factory.
        amp: None, "bf16" or "fp16".
        channels_last: use the channels-last memory format for the model and the batch.
        device: where the steps run.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int | None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
        optimizer: OptimizerSpec,
        amp: Literal["bf16", "fp16"] | None,
        channels_last: bool,
        device: torch.device,
    ) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(
                "num_classes is needed for synthetic targets and the model has no num_classes attribute. "
                "Pass num_classes=..."
            )
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.optimizer_spec = optimizer
        self.amp = amp
        self.channels_last = channels_last and len(self.input_shape) == 3
        self.device = device
        self.optimizer: torch.optim.Optimizer | None = None
        self._saved: dict[str, Any] = {}
        self._restore = ExitStack()
        self._norm_stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._scaler: torch.amp.GradScaler | None = None

    # --- saving and restoring ----------------------------------------------------------------------------
    def __enter__(self) -> ModuleWorkload:
        model = self.model
        params = list(model.parameters())
        self._saved = {
            "params": [_host_copy(p) for p in params],
            "grads": [_host_copy(p.grad) if p.grad is not None else None for p in params],
            "buffers": [_host_copy(b) for b in model.buffers()],
            "training": model.training,
            "device": params[0].device if params else None,
            "user_optimizer": _host_state(self.optimizer_spec)
            if isinstance(self.optimizer_spec, torch.optim.Optimizer)
            else None,
        }
        self._restore.enter_context(_fork_rng(self.device))
        self._restore.callback(self._put_back)
        if self._saved["device"] is not None and self._saved["device"] != self.device:
            model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        norm_buffers = {
            id(b) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(False)
        }
        self._norm_stats = [(b, s) for b, s in zip(model.buffers(), self._saved["buffers"]) if id(b) in norm_buffers]
        self.optimizer = _make_optimizer(self.optimizer_spec, model)
        self._scaler = (
            torch.amp.GradScaler(self.device.type) if self.amp == "fp16" and self.device.type == "cuda" else None
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.optimizer = None
        self._restore.close()

    def _put_back(self) -> None:
        model, saved = self.model, self._saved
        if saved["device"] is not None and saved["device"] != self.device:
            model.to(saved["device"])
        with torch.no_grad(), _disable_current_modes():
            for param, value, grad in zip(model.parameters(), saved["params"], saved["grads"]):
                param.copy_(value)
                param.grad = None if grad is None else grad.to(param.device)
            for buffer, value in zip(model.buffers(), saved["buffers"]):
                buffer.copy_(value)
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.train(saved["training"])
        if saved["user_optimizer"] is not None:
            self.optimizer_spec.load_state_dict(saved["user_optimizer"])  # type: ignore[union-attr]

    # --- the Workload protocol ---------------------------------------------------------------------------
    def warm_up(self, batch_size: int) -> None:
        """One step at a tiny size, uncounted, so every trial measures the optimizer's steady state."""
        self.step(batch_size)

    def step(self, batch_size: int) -> None:
        assert self.optimizer is not None, "use ModuleWorkload as a context manager"
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        inputs = torch.randn(batch_size, *self.input_shape, device=self.device).to(memory_format=memory_format)
        targets = torch.randint(self.num_classes, (batch_size,), device=self.device)  # type: ignore[arg-type]
        with _autocast(self.device, self.amp):
            loss = self.loss_fn(self.model(inputs), targets)
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def recover(self) -> None:
        """After a failed step: drop partial gradients and put BatchNorm's running statistics back."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        # A host-to-device copy into existing buffers allocates nothing on a real device; keep trackers
        # (the simulation) from booking the host copy as device memory.
        with torch.no_grad(), _disable_current_modes():
            for buffer, value in self._norm_stats:
                buffer.copy_(value)


def _host_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    return {
        "state": tree_map(_host_copy, state["state"]),
        "param_groups": tree_map(_host_copy, state["param_groups"]),
    }


def _make_optimizer(spec: OptimizerSpec, model: nn.Module) -> torch.optim.Optimizer:
    if isinstance(spec, torch.optim.Optimizer):
        return spec
    if isinstance(spec, str):
        if spec not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {spec!r}. Use one of: {', '.join(OPTIMIZERS)}, or pass an optimizer.")
        return OPTIMIZERS[spec](model.parameters())
    if callable(spec):
        return spec(model.parameters())
    raise TypeError(f"optimizer must be a name, an optimizer or a factory, got {spec!r}.")


def _autocast(device: torch.device, amp: str | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else nullcontext()


def _fork_rng(device: torch.device) -> AbstractContextManager[None]:
    if device.type in ("cuda", "mps"):
        return torch.random.fork_rng(device_type=device.type)
    return torch.random.fork_rng(devices=[])


def make_workload(
    target: nn.Module | Callable[[int], object],
    *,
    device: torch.device,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: OptimizerSpec = "adamw",
    amp: Literal["bf16", "fp16"] | None = None,
    channels_last: bool = False,
) -> ModuleWorkload | CallableWorkload:
    """A workload for a module (checked first: a module is callable too) or a step function."""
    if isinstance(target, nn.Module):
        if input_shape is None:
            raise ValueError(
                "input_shape is needed to build synthetic batches for a model, e.g. input_shape=(3, 224, 224)."
            )
        return ModuleWorkload(
            target,
            input_shape=input_shape,
            num_classes=num_classes,
            loss_fn=loss_fn,
            optimizer=optimizer,
            amp=amp,
            channels_last=channels_last,
            device=device,
        )
    if callable(target):
        return CallableWorkload(target)
    raise TypeError(f"target must be an nn.Module or a step(batch_size) function, got {type(target).__name__}.")
