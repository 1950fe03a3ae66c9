"""`BatchSizeFinder`: a Lightning callback that measures the batch size instead of crashing its way up.

Lightning's own finder grows the batch until an out-of-memory error (which it does not recognise on MPS), with
no headroom, and refuses DDP. This one probes the LightningModule's own step in ``on_fit_start`` with
`find_safe_batch_size`: the worst-case sample of the train dataloader batched to each trial size (through the
loader's collate function), ``training_step`` under the trainer's precision context, backward, and a step of the
optimizer from ``configure_optimizers``. The weights, the optimizer state and the random streams are put back
afterwards; the trainer's loops, loggers and callbacks never run during the probe, so their state is untouched,
and nothing is written to ``default_root_dir``.

Example:
    >>> from mps_autobatch.lightning import BatchSizeFinder
    >>> finder = BatchSizeFinder(requested=64)   # then L.Trainer(callbacks=[finder]).fit(model, datamodule)
    >>> finder.optimal_batch_size is None
    True
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from torch.utils.data import DataLoader, IterableDataset

from . import distributed, inputs
from .accumulation import EffectivePlan, plan_effective_batch
from .devices import MemoryBackend, get_backend
from .errors import AutobatchError
from .probe import find_safe_batch_size, module_fingerprint, with_worst_case
from .results import ProbeResult
from .step import fork_rng

__all__ = ["BatchSizeFinder"]

log = logging.getLogger(__name__)


class BatchSizeFinder(pl.Callback):
    """Find the largest safe batch size of a LightningModule's training step by measuring it, at fit start.

    Args:
        requested: the effective batch you want. The micro-batch written to ``batch_arg_name`` is the largest
            divisor of it that fits and ``trainer.accumulate_grad_batches`` makes the product exact; when that
            divisor is under 80 % of the largest size that fits, the largest size is used with the smallest
            accumulation whose product is at least ``requested`` (said in the log and ``plan.note``). Without
            it, the largest safe size is written and the accumulation is left alone (Lightning's behaviour).
        steps_per_trial: training steps per trial (Lightning's default is 3; one measures the peak).
        init_val: where the search starts when ``requested`` is not given.
        batch_arg_name: the attribute holding the batch size, on the module, its hparams or the datamodule.
        max_val: never probe above this size.
        headroom: the fraction of the memory limit kept free (20 % by default).
        memory_limit: bytes or e.g. "8GiB"; default: what the device allows.
        device: the trainer's root device by default; a backend object such as
            ``mps_autobatch.simulate.simulated_backend("mps:16GiB")`` is accepted (how the tests run it).
        find_max: also find the largest size that runs at all.
        cache: reuse an answer found before for the same module, sample and settings on this device.
        eval_batch_arg_name: where an eval probe's answer goes (the validation loader's batch size); without it
            the evaluation loaders keep sharing ``batch_arg_name``, as in Lightning.

    Attributes:
        optimal_batch_size: the micro-batch written to ``batch_arg_name``.
        result: the training probe's `ProbeResult`; ``eval_result`` the eval probe's.
        plan: with ``requested``, the micro-batch, the accumulation and whether the product is exact.
    """

    def __init__(
        self,
        *,
        requested: int | None = None,
        steps_per_trial: int = 1,
        init_val: int = 2,
        batch_arg_name: str = "batch_size",
        max_val: int | None = None,
        headroom: float = 0.2,
        memory_limit: int | str | None = None,
        device: str | MemoryBackend | None = None,
        find_max: bool = False,
        cache: bool = False,
        eval_batch_arg_name: str | None = None,
    ) -> None:
        if isinstance(init_val, bool) or not isinstance(init_val, int) or init_val < 1:
            raise ValueError(f"init_val must be a positive int, got {init_val!r}. Pass e.g. init_val=2.")
        self.requested, self.steps_per_trial, self.init_val = requested, steps_per_trial, init_val
        self.batch_arg_name, self.eval_batch_arg_name = batch_arg_name, eval_batch_arg_name
        self.max_val, self.headroom, self.memory_limit = max_val, headroom, memory_limit
        self.device, self.find_max, self.cache = device, find_max, cache
        self.optimal_batch_size: int | None = None
        self.result: ProbeResult | None = None
        self.eval_result: ProbeResult | None = None
        self.plan: EffectivePlan | None = None
        self._cap = ExitStack()

    # --- Lightning hooks ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "fast_dev_run", False):
            log.warning("BatchSizeFinder: skipped, fast_dev_run is on.")
            return
        self._check(pl_module, self.batch_arg_name)
        if not pl_module.automatic_optimization:
            raise AutobatchError(
                "BatchSizeFinder probes automatic optimization (training_step returns the loss); this module uses "
                "manual optimization. Probe its step with find_safe_batch_size(step_function) instead."
            )
        backend = self._backend(trainer)
        self.result = self._probe(trainer, pl_module, backend, "train")
        safe = self.result.batch_size
        size = safe
        if self.requested is not None:
            self.plan = plan_effective_batch(self.requested, safe)
            size = self.plan.micro
            # What is written, not plan_accumulation's near-equal micro-batches: Lightning's are all one size.
            self.result = dataclasses.replace(self.result, accumulation=(size, self.plan.accumulation))
            trainer.accumulate_grad_batches = self.plan.accumulation
            log.info("BatchSizeFinder: %s", self.plan.note)
        lightning_setattr(pl_module, self.batch_arg_name, size)
        self.optimal_batch_size = size
        log.info("BatchSizeFinder: %s = %d (largest safe: %d).", self.batch_arg_name, size, safe)
        if self.eval_batch_arg_name is not None:
            self._check(pl_module, self.eval_batch_arg_name)
            self.eval_result = self._probe(trainer, pl_module, backend, "eval")
            lightning_setattr(pl_module, self.eval_batch_arg_name, self.eval_result.batch_size)
            log.info("BatchSizeFinder: %s = %d.", self.eval_batch_arg_name, self.eval_result.batch_size)
        _reset_dataloaders(trainer)
        if backend.keeps_cap_while_training:  # MPS: a runaway step raises instead of swapping, until the fit ends
            self._cap.enter_context(backend.session(self.result.limit_bytes))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "validate":
            return  # inside a fit, on_fit_start sized it
        self._size_stage(trainer, pl_module, trainer.validate_loop, "val_dataloaders", "validation_step")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._size_stage(trainer, pl_module, trainer.test_loop, "test_dataloaders", "test_step")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._size_stage(trainer, pl_module, trainer.predict_loop, "predict_dataloaders", "predict_step")

    def _size_stage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loop: Any, loaders: str, step: str
    ) -> None:
        """validate/test/predict: the stage's own step probed in eval mode, its dataloader rebuilt at the answer."""
        name = self.eval_batch_arg_name or self.batch_arg_name
        self._check(pl_module, name)
        loader = _first_loader(getattr(trainer, loaders))
        self.eval_result = self._probe(trainer, pl_module, self._backend(trainer), "eval", loader, step)
        lightning_setattr(pl_module, name, self.eval_result.batch_size)
        self.optimal_batch_size = self.eval_result.batch_size
        log.info("BatchSizeFinder: %s = %d for %s.", name, self.eval_result.batch_size, step)
        loop._combined_loader = None  # rebuilt at the new size, and the loop reset onto it (as Lightning's finder)
        loop.setup_data()
        loop.reset()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._cap.close()  # the MPS cap set for the fit, restored

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._cap.close()

    # --- the probe ------------------------------------------------------------------------------------------
    def _check(self, pl_module: pl.LightningModule, name: str) -> None:
        if not lightning_hasattr(pl_module, name):
            raise AutobatchError(
                f"BatchSizeFinder writes the batch size to {name!r}, which neither the module, its hparams nor the "
                f"datamodule has. Add a {name!r} attribute that the dataloaders read, or pass batch_arg_name=."
            )

    def _backend(self, trainer: pl.Trainer) -> MemoryBackend:
        if self.device is not None:
            return get_backend(self.device)
        root = trainer.strategy.root_device
        return get_backend(f"cuda:{root.index or 0}" if root.type == "cuda" else root.type)

    def _probe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        backend: MemoryBackend,
        mode: Literal["train", "eval"],
        loader: DataLoader | None = None,
        step_name: str = "validation_step",
    ) -> ProbeResult:
        loader = loader if loader is not None else _loader(trainer, mode)
        picked, collate = _worst_case(loader)
        optimizer = trainer.optimizers[0] if mode == "train" else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_state = scaler.state_dict() if scaler is not None else None

        def forward_backward(batch: Any) -> torch.Tensor:
            # Lightning's order: the forward (last step's gradients still held), zero_grad, then backward.
            with _no_sync(trainer):
                output = trainer.strategy.training_step(batch, 0)
                loss = output["loss"] if isinstance(output, Mapping) else output
                if not isinstance(loss, torch.Tensor):
                    raise AutobatchError(
                        "training_step returned no loss (None skips the batch): BatchSizeFinder needs a batch it "
                        "trains on. Return the loss, or a dict with 'loss'."
                    )
                optimizer.zero_grad()  # type: ignore[union-attr]
                trainer.strategy.backward(loss, optimizer)
            return loss.detach()

        def training_step(batch_size: int) -> None:
            # Under DDP: every rank's backward, one vote, then the gradients' all-reduce (one flat buffer, at least
            # what DDP's buckets take): a rank that ran out of memory never leaves the others inside a collective.
            def closure() -> torch.Tensor | None:
                error, loss = None, None
                try:
                    batch = trainer.strategy.batch_to_device(inputs.batch_of(picked.example, batch_size, collate))
                    loss = forward_backward(batch)
                except Exception as exc:
                    traceback.clear_frames(exc.__traceback__)
                    error = exc
                distributed.agree_on_outcome(error, "the training step")
                distributed.average_gradients(pl_module.parameters())
                return loss

            # Through the precision plugin, as the fit loop does: the closure inside optimizer.step, the scaler,
            # gradient clipping.
            trainer.strategy.optimizer_step(optimizer, closure)  # type: ignore[arg-type]

        if mode == "eval" and not pl.utilities.model_helpers.is_overridden(step_name, pl_module):
            raise AutobatchError(
                f"BatchSizeFinder sizes evaluation with the module's {step_name}, and it has none. Drop "
                f"eval_batch_arg_name, or add a {step_name}."
            )

        def evaluation_step(batch_size: int) -> None:
            batch = trainer.strategy.batch_to_device(inputs.batch_of(picked.example, batch_size, collate))
            with torch.inference_mode(), trainer.precision_plugin.forward_context():
                getattr(pl_module, step_name)(batch, 0)

        step = training_step if mode == "train" else evaluation_step
        key = f"lightning:{type(pl_module).__name__}:{module_fingerprint(pl_module)}:{inputs.describe(picked.example)}"
        key += f":{trainer.precision}:{type(optimizer).__name__ if optimizer is not None else 'eval'}"
        was_training = pl_module.training
        pl_module.train(mode == "train")
        try:
            with fork_rng(backend.device), _logging_off(pl_module):
                result = find_safe_batch_size(
                    step,
                    model=pl_module,
                    optimizer=optimizer,
                    device=backend,
                    memory_limit=self.memory_limit,
                    headroom=self.headroom,
                    requested=self.requested if mode == "train" else None,
                    start=self.init_val if self.requested is None or mode == "eval" else None,
                    max_batch_size=_cap(self.max_val, loader),
                    steps_per_trial=self.steps_per_trial,
                    find_max=self.find_max,
                    mode=mode,
                    cache=self.cache,
                    cache_key=key if self.cache else None,
                )
        finally:
            pl_module.train(was_training)
            if scaler is not None and scaler_state is not None:
                scaler.load_state_dict(scaler_state)
        return with_worst_case(result, picked)


def _cap(max_val: int | None, loader: DataLoader) -> int | None:
    """Never probe a batch larger than the dataset (Lightning's finder stops there too)."""
    length = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    return min(v for v in (max_val, length) if v is not None) if (max_val or length) else None


def _loader(trainer: pl.Trainer, mode: str) -> DataLoader:
    """The train (or validation) dataloader as the fit loop builds it; reset afterwards by `_reset_dataloaders`."""
    if mode == "train":
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    else:
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loader = trainer.val_dataloaders
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader  # no validation: its samples are the training ones
    return _first_loader(loader)


def _first_loader(loader: Any) -> DataLoader:
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise AutobatchError(f"BatchSizeFinder needs a torch DataLoader to batch samples, got {type(loader).__name__}.")
    return loader


def _worst_case(loader: DataLoader) -> tuple[inputs.WorstCase, Any]:
    """The loader's worst-case sample (map-style datasets) and its collate function."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        first = next(iter(loader))
        sample = _first_sample(first)
        return inputs.WorstCase(0, sample, inputs.elements(sample), 1, 1), None
    return inputs.worst_case(dataset), loader.collate_fn  # type: ignore[arg-type]


def _first_sample(batch: Any) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda leaf: leaf[0] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf, batch)


def _reset_dataloaders(trainer: pl.Trainer) -> None:
    """Make the fit loop build its dataloaders again, at the new batch size (as Lightning's own finder does)."""
    trainer.fit_loop._combined_loader = None
    trainer.fit_loop.epoch_loop.val_loop._combined_loader = None


@contextmanager
def _no_sync(trainer: pl.Trainer) -> Iterator[None]:
    """Under DDP, no gradient all-reduce inside backward: a rank that runs out of memory would leave the others
    waiting in it. The ranks agree on each trial's outcome afterwards (`find_safe_batch_size` under torchrun)."""
    model = trainer.strategy.model
    with model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext():
        yield


@contextmanager
def _logging_off(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` needs the fit loop's result collection, which does not exist before the fit: a no-op meanwhile."""

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log, pl_module.log_dict = ignore, ignore  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
