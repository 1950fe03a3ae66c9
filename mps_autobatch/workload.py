"""Turn what the user has into the `Workload` the search runs: a model, or a step function.

For a model, each step is a `mps_autobatch.step.TrainingStep` on a batch built inside the step: random
values of the given input shape, or copies of one example (`mps_autobatch.inputs`), with the user's AMP and
memory-format settings; in eval mode it is `mps_autobatch.step.evaluation_output`, the forward alone.
The model's parameters, buffers, gradients, the optimizer's state and the RNG are saved to host memory first
(never a second copy on the device, which would distort what is measured)
and put back bit for bit afterwards, whatever happens.

For a step function, the probe sees which modules ran and which optimizers stepped while a step ran
(global module and optimizer hooks), so a step that runs out of memory leaves nothing behind: the
gradients of those modules are dropped and the optimizer state the failed step created is removed.
Given ``model=`` and ``optimizer=``, those are also saved and put back bit for bit afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from . import inputs as batches
from .step import Amp, Rewind, TrainingStep, evaluation_output, fork_rng

__all__ = [
    "OPTIMIZERS",
    "CallableWorkload",
    "ModuleWorkload",
    "OptimizerSpec",
    "Workload",
    "make_workload",
    "model_and_optimizer",
]

OptimizerSpec = str | torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
}
"""Optimizers by name. Their state (two moments for Adam, a momentum buffer for SGD) is part of the peak."""


class Workload(Protocol):
    """What the search runs. `make_workload` builds one from a model or a step function."""

    def warm_up(self, batch_size: int) -> None:
        """Run once before the search at a tiny size, uncounted (e.g. create the optimizer state)."""

    def step(self, batch_size: int) -> None:
        """Run one full training step (forward, backward, optimizer) at ``batch_size``."""

    def recover(self) -> None:
        """Undo what a failed step left behind (partial gradients, BatchNorm statistics)."""


def _host_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def _host_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = optimizer.state_dict()
    return {
        "state": tree_map(_host_copy, state["state"]),
        "param_groups": tree_map(_host_copy, state["param_groups"]),
    }


class _Snapshot:
    """A model's parameters, gradients, buffers and mode, and an optimizer's state, in host memory.

    `restore` puts them back bit for bit, on the device the model was on.
    """

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        self.model, self.optimizer = model, optimizer
        params = list(model.parameters()) if model is not None else []
        self.params = [_host_copy(p) for p in params]
        self.grads = [_host_copy(p.grad) if p.grad is not None else None for p in params]
        self.buffers = [_host_copy(b) for b in model.buffers()] if model is not None else []
        self.training = model.training if model is not None else True
        self.device = params[0].device if params else None
        self.optimizer_state = _host_state(optimizer) if optimizer is not None else None

    def restore(self) -> None:
        model = self.model
        if model is not None:
            if self.device is not None:
                model.to(self.device)
            with torch.no_grad(), _disable_current_modes():
                for param, value, grad in zip(model.parameters(), self.params, self.grads):
                    param.copy_(value)
                    param.grad = None if grad is None else grad.to(param.device)
                for buffer, value in zip(model.buffers(), self.buffers):
                    buffer.copy_(value)
            model.train(self.training)
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.state.clear()  # state the probe created for parameters that had none
            self.optimizer.load_state_dict(self.optimizer_state)


class CallableWorkload:
    """A user's own ``step(batch_size)``: run for the warm-up and the trials, cleaned up after a failure.

    While a step runs, global hooks record the modules whose forward ran and the optimizers that
    stepped, with the parameters each had state for. `recover` (after an out-of-memory error) drops
    the gradients of those modules' parameters and the optimizer state the failed step created, so
    the next trial starts from what the last good step left. ``model`` and ``optimizer``, when given,
    are saved on entry and put back bit for bit on exit.
    """

    def __init__(
        self,
        step: Callable[[int], object],
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self._step = step
        self._model, self._optimizer = model, optimizer
        self._snapshot: _Snapshot | None = None
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # optimizer -> ids of the parameters it had state for before the step that is running
        self._stepped: weakref.WeakKeyDictionary[torch.optim.Optimizer, set[int]] = weakref.WeakKeyDictionary()

    def __enter__(self) -> CallableWorkload:
        if self._model is not None or self._optimizer is not None:
            self._snapshot = _Snapshot(self._model, self._optimizer)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._snapshot is not None:
            self._snapshot.restore()
            self._snapshot = None

    def warm_up(self, batch_size: int) -> None:
        """One step at a tiny size, uncounted: it creates the optimizer state every later step finds."""
        self.step(batch_size)

    def step(self, batch_size: int) -> None:
        self._modules.clear()
        self._stepped.clear()
        with self._watching():
            self._step(batch_size)

    @contextmanager
    def _watching(self) -> Iterator[None]:
        def ran(module: nn.Module, *_: Any) -> None:
            self._modules.add(module)

        def stepping(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            if optimizer not in self._stepped:
                self._stepped[optimizer] = {id(p) for p in optimizer.state}

        def stepped(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            self._stepped.pop(optimizer, None)  # a step that finished created nothing to undo

        handles = [
            nn.modules.module.register_module_forward_pre_hook(ran),
            register_optimizer_step_pre_hook(stepping),
            register_optimizer_step_post_hook(stepped),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def recover(self) -> None:
        """After a failed step: drop the gradients of the modules that ran and the state its optimizer step made."""
        for module in list(self._modules):
            module.zero_grad(set_to_none=True)
        for optimizer, had_state in list(self._stepped.items()):
            for param in [p for p in optimizer.state if id(p) not in had_state]:
                del optimizer.state[param]
            optimizer.zero_grad(set_to_none=True)
        self._modules.clear()
        self._stepped.clear()


class ModuleWorkload:
    """Steps of ``model`` on batches it builds itself, on ``device``; a context manager that restores.

    Args:
        model: the module; moved to ``device`` while probing and back afterwards.
        input_shape: the shape of one sample, e.g. ``(3, 224, 224)``: random batches of it with synthetic targets.
        example: instead of ``input_shape``, one real sample (a tensor, an ``(inputs, target)`` pair or a dict),
            batched by stacking copies (`mps_autobatch.inputs`).
        collate_fn: batches copies of ``example`` instead of torch's ``default_collate``.
        num_classes: classes for synthetic targets (default: ``model.num_classes``, as timm sets it).
        loss_fn: ``loss_fn(output, target)`` (``loss_fn(output, batch)`` for a dict); default cross-entropy, or
            the output's ``.loss`` for a dict.
        optimizer: a name from `OPTIMIZERS`, an optimizer over the model's parameters, or a factory.
        amp: None, "bf16" or "fp16".
        channels_last: use the channels-last memory format for the model and the batch.
        device: where the steps run.
        grad_scaler: whether fp16 steps go through a GradScaler (the backend says; CUDA only).
        mode: "train" (forward, backward, optimizer) or "eval" (the forward alone, in eval and inference mode,
            no optimizer state).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int] | None = None,
        example: Any = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_classes: int | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        optimizer: OptimizerSpec = "adamw",
        amp: Amp | None = None,
        channels_last: bool = False,
        device: torch.device,
        grad_scaler: bool = False,
        mode: Literal["train", "eval"] = "train",
    ) -> None:
        if (input_shape is None) == (example is None):
            raise ValueError(
                "A model needs input_shape=(...) for random batches or example= with one real sample: pass one."
            )
        self.model = model
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.example, self.collate_fn = example, collate_fn
        self.kind: batches.Kind = "tensor" if example is None else batches.kind_of(example)
        self.mode = mode
        self.num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        needs_classes = self.kind == "tensor" and mode == "train"
        if needs_classes and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(
                "num_classes is needed for synthetic targets and the model has no num_classes attribute. "
                "Pass num_classes=..."
            )
        self.loss_fn = loss_fn
        self.optimizer_spec = optimizer
        self.amp = amp
        self.channels_last = channels_last and (self.input_shape is None or len(self.input_shape) == 3)
        self.device = device
        self.grad_scaler = grad_scaler and amp == "fp16"
        self.training_step: TrainingStep | None = None
        self._entered = False
        self._restore = ExitStack()
        self._rewind: Rewind | None = None

    def __enter__(self) -> ModuleWorkload:
        model = self.model
        user_optimizer = self.optimizer_spec if isinstance(self.optimizer_spec, torch.optim.Optimizer) else None
        snapshot = _Snapshot(model, user_optimizer)
        self._restore.enter_context(fork_rng(self.device))
        self._restore.callback(self._put_back, snapshot)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train(self.mode == "train")
        self._rewind = Rewind(model, self.device)
        self._entered = True
        if self.mode == "eval":
            return self  # no optimizer: evaluation keeps no state
        self.training_step = TrainingStep(
            model,
            _make_optimizer(self.optimizer_spec, model),
            self.loss_fn,
            amp=self.amp,
            scaler=torch.amp.GradScaler(self.device.type) if self.grad_scaler else None,
            channels_last=self.channels_last,
            device=self.device,
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.training_step, self._entered = None, False
        self._restore.close()

    def _put_back(self, snapshot: _Snapshot) -> None:
        snapshot.restore()
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)

    # --- the Workload protocol ---------------------------------------------------------------------------
    def warm_up(self, batch_size: int) -> None:
        """One step at a tiny size, uncounted, so every trial measures the optimizer's steady state."""
        self.step(batch_size)

    def step(self, batch_size: int) -> None:
        if not self._entered:
            raise RuntimeError("ModuleWorkload.step() needs the workload entered: use `with workload: ...`.")
        inputs, targets = self._batch(batch_size)
        if self.training_step is None:
            evaluation_output(self.model, inputs, device=self.device, amp=self.amp, channels_last=self.channels_last)
        else:
            self.training_step(inputs, targets)

    def _batch(self, batch_size: int) -> tuple[Any, torch.Tensor | None]:
        """(inputs, targets) built here, inside the measured step; targets None for a dict (it holds them)."""
        if self.kind == "dict":
            return batches.batch_of(self.example, batch_size, self.collate_fn), None
        if self.kind == "pair":
            inputs, targets = batches.batch_of(self.example, batch_size, self.collate_fn)
            return inputs, targets
        if self.input_shape is not None:
            inputs = torch.randn(batch_size, *self.input_shape, device=self.device)
        else:
            inputs = batches.batch_of(self.example, batch_size, self.collate_fn)
        if self.mode == "eval":
            return inputs, None
        return inputs, torch.randint(self.num_classes, (batch_size,), device=self.device)  # type: ignore[arg-type]

    def recover(self) -> None:
        """After a failed step: drop partial gradients and put BatchNorm's running statistics back."""
        if self.training_step is not None:
            self.training_step.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        if self._rewind is not None:
            self._rewind.restore()


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


def model_and_optimizer(workload: Workload) -> tuple[nn.Module | None, torch.optim.Optimizer | None]:
    """The model and optimizer a workload steps (None where it does not know them: a bare step function).

    Example:
        >>> work = ModuleWorkload(nn.Linear(4, 2), input_shape=(4,), num_classes=2, device=torch.device("cpu"))
        >>> with work:
        ...     model, optimizer = model_and_optimizer(work)
        >>> type(model).__name__, type(optimizer).__name__
        ('Linear', 'AdamW')
    """
    if isinstance(workload, ModuleWorkload):
        step = workload.training_step
        return workload.model, step.optimizer if step is not None else None
    if isinstance(workload, CallableWorkload):
        return workload._model, workload._optimizer
    return None, None


def make_workload(
    target: nn.Module | Callable[[int], object],
    *,
    device: torch.device,
    input_shape: Sequence[int] | None = None,
    example: Any = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_classes: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: OptimizerSpec | None = None,
    amp: Amp | None = None,
    channels_last: bool = False,
    grad_scaler: bool = False,
    model: nn.Module | None = None,
    mode: Literal["train", "eval"] = "train",
) -> ModuleWorkload | CallableWorkload:
    """A workload for a module (checked first: a module is callable too) or a step function.

    For a module, what is wrong with it and its input is said before any step (`inputs.check_model_input`). For
    a step function, ``model`` and ``optimizer`` (an optimizer instance) are saved and restored.
    """
    if isinstance(target, type):
        raise TypeError(
            f"target is the class {target.__name__}, not a model: pass an instance, e.g. {target.__name__}(...), "
            "or a step(batch_size) function."
        )
    if isinstance(target, nn.Module):
        if input_shape is None and example is None:
            raise ValueError(
                "input_shape or example is needed to build batches for a model: e.g. input_shape=(3, 224, 224), "
                "or example= with one real sample."
            )
        kind = "tensor" if example is None else batches.kind_of(example)
        if kind == "tensor":
            model_inputs: Any = example if example is not None else object()  # one positional input
        else:  # what the forward will receive: a batch of one, through the collate function
            one = batches.batch_of(example, 1, collate_fn)
            model_inputs = one if kind == "dict" else one[0]
        batches.check_model_input(target, model_inputs, from_shape=input_shape)
        return ModuleWorkload(
            target,
            input_shape=input_shape,
            example=example,
            collate_fn=collate_fn,
            num_classes=num_classes,
            loss_fn=loss_fn,
            optimizer=optimizer if optimizer is not None else "adamw",
            amp=amp,
            channels_last=channels_last,
            device=device,
            grad_scaler=grad_scaler,
            mode=mode,
        )
    if callable(target):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module to save and restore, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be the step's torch.optim.Optimizer to save and restore, got {optimizer!r}."
            )
        return CallableWorkload(target, model=model, optimizer=optimizer)
    raise TypeError(f"target must be an nn.Module or a step(batch_size) function, got {type(target).__name__}.")
