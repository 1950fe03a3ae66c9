"""`tune_trainer`: size a Hugging Face `Trainer`'s batches by measuring its own step, before `train()`.

``TrainingArguments(auto_find_batch_size=True)`` restarts the whole loop at 0.9x on each out-of-memory error,
changes the effective batch without a word, and lets an evaluation OOM shrink the training batch. This probes
the trainer's own ``training_step`` (its ``compute_loss``, its accelerator's backward) and a real step of the
optimizer ``create_optimizer()`` builds, on the worst-case sample of ``train_dataset`` through the trainer's data
collator; then ``prediction_step`` on ``eval_dataset`` for the evaluation batch. It sets
``per_device_train_batch_size`` and ``gradient_accumulation_steps`` so their product is the effective batch (the
divisor rule of `mps_autobatch.accumulation.plan_effective_batch`) and ``per_device_eval_batch_size`` apart.

Example:
    >>> from mps_autobatch.transformers import tune_trainer
    >>> callable(tune_trainer)   # trainer = Trainer(...); tune_trainer(trainer); trainer.train()
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import Trainer
from transformers.utils import logging

from . import inputs
from .accumulation import EffectivePlan, plan_effective_batch
from .errors import AutobatchError
from .probe import find_safe_batch_size, with_worst_case
from .results import ProbeResult
from .step import fork_rng

__all__ = ["tune_trainer"]

logger = logging.get_logger("transformers.trainer")  # the trainer's own logger


def tune_trainer(trainer: Trainer, *, effective_batch_size: int | None = None, **probe_options: Any) -> ProbeResult:
    """Probe ``trainer``'s own step and set its train and eval batch sizes and gradient accumulation.

    Args:
        trainer: a `transformers.Trainer` with a ``train_dataset`` (and, for the eval size, an ``eval_dataset``),
            before ``train()``.
        effective_batch_size: samples per optimizer update on each device (default: the arguments'
            ``per_device_train_batch_size x gradient_accumulation_steps``). The micro-batch is its largest
            divisor that fits, and the accumulation makes the product exact; when that divisor is under 80 % of
            the largest size that fits, the largest size with the smallest accumulation above it (logged).
        **probe_options: `find_safe_batch_size` options: ``device`` (default: the trainer's), ``memory_limit``,
            ``headroom``, ``cache``, ``max_samples``, ...

    Returns:
        The training probe's `ProbeResult`; its note says the plan and the evaluation size.

    Raises:
        AutobatchError: ``auto_find_batch_size=True`` is set (it would shrink the batch again), DeepSpeed or FSDP
            is configured (sharded memory is not modelled), or there is no ``train_dataset``.
    """
    args = trainer.args
    _check(trainer)
    effective = effective_batch_size or args.per_device_train_batch_size * args.gradient_accumulation_steps
    options = {"device": _device(trainer), **probe_options}
    max_samples = options.pop("max_samples", inputs.DEFAULT_MAX_SAMPLES)
    result = _probe_training(trainer, effective, options, max_samples)
    plan = plan_effective_batch(effective, result.batch_size)
    _set_train_size(trainer, plan)
    note = f"Per device: {plan.note}"
    if trainer.eval_dataset is not None:
        evaluation = _probe_evaluation(trainer, options, max_samples)
        args.per_device_eval_batch_size = evaluation.batch_size
        note += f" Evaluation batch: {evaluation.batch_size}."
    logger.info(
        "mps-autobatch: per_device_train_batch_size=%d, gradient_accumulation_steps=%d, "
        "per_device_eval_batch_size=%d (largest safe train batch: %d). %s",
        args.per_device_train_batch_size,
        args.gradient_accumulation_steps,
        args.per_device_eval_batch_size,
        result.batch_size,
        "" if plan.exact else plan.note,
    )
    return dataclasses.replace(
        result, note=f"{result.note} {note}".strip(), accumulation=(plan.micro, plan.accumulation)
    )


def _check(trainer: Trainer) -> None:
    args = trainer.args
    if args.auto_find_batch_size:
        raise AutobatchError(
            "TrainingArguments(auto_find_batch_size=True) would shrink the batch at 0.9x on every out-of-memory "
            "error, the effective batch with it: set auto_find_batch_size=False, tune_trainer sizes it by measuring."
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False) or args.deepspeed:
        raise AutobatchError(
            "tune_trainer measures one device's whole model, and DeepSpeed or FSDP shards it (sharded memory is not "
            "modelled): size the batch with the sharding's own tools, or train without sharding."
        )
    if trainer.train_dataset is None:
        raise AutobatchError("tune_trainer needs the trainer's train_dataset: pass Trainer(train_dataset=...).")


def _device(trainer: Trainer) -> str:
    device = trainer.args.device
    return f"cuda:{device.index or 0}" if device.type == "cuda" else device.type


def _set_train_size(trainer: Trainer, plan: EffectivePlan) -> None:
    args = trainer.args
    args.per_device_train_batch_size = plan.micro
    args.gradient_accumulation_steps = plan.accumulation
    # Trainer.__init__ copied args.train_batch_size here, and the train dataloader reads this copy.
    trainer._train_batch_size = args.train_batch_size


def _worst_case(loader: Any, max_samples: int) -> tuple[inputs.WorstCase, Any]:
    """The worst-case sample of a trainer's dataloader (its dataset without unused columns) and its collator."""
    return inputs.worst_case(loader.dataset, max_samples), loader.collate_fn


@contextmanager
def _optimizer_of(trainer: Trainer) -> Iterator[torch.optim.Optimizer]:
    """The optimizer ``create_optimizer()`` builds (AdamW by default), and ``trainer.optimizer`` put back after."""
    before = trainer.optimizer
    try:
        yield trainer.create_optimizer()
    finally:
        trainer.optimizer = before


@contextmanager
def _before_train(trainer: Trainer) -> Iterator[None]:
    """What ``training_step`` reads that only ``train()`` sets, for the probe's steps, then removed again."""
    had = hasattr(trainer, "current_gradient_accumulation_steps")
    previous = getattr(trainer, "current_gradient_accumulation_steps", None)
    trainer.current_gradient_accumulation_steps = 1
    try:
        yield
    finally:
        if had:
            trainer.current_gradient_accumulation_steps = previous
        else:
            del trainer.current_gradient_accumulation_steps


def _model(trainer: Trainer) -> torch.nn.Module:
    if trainer.model is None:
        raise AutobatchError("tune_trainer needs the trainer's model: pass Trainer(model=...).")
    return trainer.model


def _probe_training(trainer: Trainer, effective: int, options: dict[str, Any], max_samples: int) -> ProbeResult:
    model = _model(trainer)
    picked, collate = _worst_case(trainer.get_train_dataloader(), max_samples)
    with _optimizer_of(trainer) as optimizer, _before_train(trainer):

        def training_step(batch_size: int) -> None:
            batch = inputs.batch_of(picked.example, batch_size, collate)
            # The trainer's own step: its _prepare_inputs, compute_loss under its context manager, and its
            # accelerator's backward; autocast as accelerator.prepare would add it in train().
            with trainer.accelerator.autocast():
                trainer.training_step(model, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with fork_rng(trainer.args.device):
            result = find_safe_batch_size(
                training_step, model=model, optimizer=optimizer, requested=effective, **_for_step(options, "train")
            )
    return with_worst_case(result, picked)


def _probe_evaluation(trainer: Trainer, options: dict[str, Any], max_samples: int) -> ProbeResult:
    model = _model(trainer)
    picked, collate = _worst_case(trainer.get_eval_dataloader(), max_samples)

    def prediction_step(batch_size: int) -> None:
        batch = trainer._prepare_inputs(inputs.batch_of(picked.example, batch_size, collate))
        with trainer.accelerator.autocast():
            trainer.prediction_step(model, batch, prediction_loss_only=False)

    was_training = model.training
    model.eval()
    try:
        with fork_rng(trainer.args.device):
            result = find_safe_batch_size(prediction_step, model=model, mode="eval", **_for_step(options, "eval"))
    finally:
        model.train(was_training)
    return with_worst_case(result, picked)


def _for_step(options: dict[str, Any], mode: str) -> dict[str, Any]:
    """`find_safe_batch_size` options for the trainer's step: a cache needs a key naming the model and mode."""
    options = dict(options)
    if options.get("cache") and "cache_key" not in options:
        raise AutobatchError("tune_trainer(cache=True) needs cache_key='...' naming the model and its data.")
    if "cache_key" in options:
        options["cache_key"] = f"{options['cache_key']}:{mode}"
    return options
