"""The training loop, read like nanoGPT's ``train.py``: setup, then one loop in a fixed order.

Each pass of the loop: set the learning rate → evaluate and checkpoint at an epoch end (or when asked)
→ forward/backward over the micro-batches → optimizer step → ``zero_grad(set_to_none=True)`` → release
the allocator's cache every K updates → log. One pass is one optimizer update on one optimisation batch
(``effective_batch_size`` samples); on an out-of-memory error the same batch is re-run in smaller
micro-batches, so no sample is skipped and the update is the same one.

The update's pieces (`forward_backward_retrying`, `one_update`) are what ``batch_size="auto"`` probes too:
`probe_training_step` runs the run's own `mps_autobatch.step.TrainingStep` through them.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import distributed
from .._units import parse_size
from ..accumulation import micro_batch_sizes
from ..devices import MemoryBackend, get_backend
from ..errors import AutobatchError, first_line, mark_failed_step
from ..oom import is_oom_error
from ..results import ProbeResult
from ..spec import ProbeSpec
from ..step import Rewind, TrainingStep, evaluation_output, fork_rng, rng_state, set_rng_state
from . import checkpoint
from ._setup import (
    choose_batch_sizes,
    create_model,
    lr_at,
    make_optimizer,
    memory_session,
    model_data_config,
    probe_event,
    resolve_device,
    seed_everything,
)
from .checkpoint import prepare_output, save_checkpoint, write_metrics
from .commands import Display, memory_bytes
from .config import TrainConfig
from .data import eval_loader, load_splits, train_batches
from .data import train_loader as make_train_loader

__all__ = [
    "MAX_OOM_RETRIES",
    "TrainResult",
    "TrainingOutOfMemory",
    "evaluate",
    "forward_backward_retrying",
    "one_update",
    "probe_evaluation",
    "probe_training_step",
    "set_lr",
    "train",
]


@dataclass(frozen=True)
class TrainResult:
    """What a run did. ``epochs`` are the metrics rows (`checkpoint.METRIC_COLUMNS`); ``events`` the probe
    and out-of-memory recoveries, and ``measured_peak``, the peak of the first updates; ``stopped`` is True when
    ``stop_after`` ended it before the last epoch; ``probe`` is the probe's result for ``batch_size="auto"``;
    ``eval_batch_size`` the evaluation batch last used (None before any evaluation with a probed one) and
    ``eval_probe`` the evaluation probe's result for ``eval_batch_size="auto"``, when it ran in this call."""

    output_dir: Path
    epochs: tuple[dict[str, Any], ...]
    events: tuple[dict[str, Any], ...]
    best_top1: float | None
    micro_batch_size: int
    effective_batch_size: int
    updates: int
    stopped: bool
    probe: ProbeResult | None = None
    eval_batch_size: int | None = None
    eval_probe: ProbeResult | None = None


@dataclass
class _State:
    """Everything that changes as the run goes; all of it is in every checkpoint."""

    micro_batch_size: int
    effective_batch_size: int
    eval_batch_size: int | None = None  # None: the micro-batch, or the probe's answer still to come ("auto")
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # optimisation batches done in the current epoch
    update: int = 0  # optimizer updates since the start
    lr: float = 0.0
    best_top1: float | None = None
    epoch_loss_sum: float = 0.0
    epoch_train_s: float = 0.0
    epoch_ooms: int = 0
    first_peaks: list[tuple[int | None, int | None]] = field(default_factory=list)  # (peak, tensors) per update
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Run:
    """What the loop reads, built once in `train`: the step, the data, the schedule, and where the run is saved."""

    model: nn.Module  # evaluated and saved; the step may run it through its DistributedDataParallel wrapper
    step: TrainingStep
    backend: MemoryBackend
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    val: DataLoader
    splits: Any
    steps_per_epoch: int
    epochs: int
    empty_cache_every: int
    checkpoint_every: int
    stop_after: int | None
    folder: Path | None  # None on ranks other than 0: rank 0's files hold the same weights and numbers
    static: dict[str, Any]  # what every checkpoint holds besides the state: config, classes, schedule, ...
    display: Display
    eval_sizing: int | str  # TrainConfig.eval_sizing
    make_val: Callable[[int], DataLoader]  # the validation loader at a batch size
    probe_eval: Callable[[], ProbeResult]  # `probe_evaluation` of this run
    eval_probe: ProbeResult | None = None

    def lr(self, update: int) -> float:
        schedule = self.static["schedule"]
        return lr_at(
            update, peak=schedule["peak_lr"], warmup=schedule["warmup_updates"], total=schedule["total_updates"]
        )

    def evaluate(self, state: _State) -> dict[str, float]:
        """Validation metrics, in evaluation batches sized by `TrainConfig.eval_sizing`, halved alone on an OOM.

        With "auto" the evaluation's own forward is probed at the first evaluation, where the optimizer state
        is in memory as it will be at every later one.
        """
        if state.eval_batch_size is None and self.eval_sizing == "auto":
            self.eval_probe = self.probe_eval()
            state.eval_batch_size = self.eval_probe.batch_size
            state.events.append(probe_event(self.eval_probe, "eval_probe"))
            self.display.probe(self.eval_probe)
            self.val = self.make_val(state.eval_batch_size)
        size = state.eval_batch_size or state.micro_batch_size
        step = self.step
        metrics = evaluate(
            self.model,
            self.val,
            device=step.device,
            amp=step.amp,
            channels_last=step.channels_last,
            batch_size=size,
            on_oom=partial(_record_eval_oom, state, self.backend, self.display),
        )
        return metrics

    def save(self, state: _State, best: bool) -> None:
        """last.pt (and best.pt), then the metrics files, all atomically; nothing on ranks other than 0."""
        if self.folder is None:
            return
        position = {k: v for k, v in dataclasses.asdict(state).items() if k not in ("rows", "events")}
        optimizer, scaler, static = self.step.optimizer, self.step.scaler, self.static
        saved = {
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {**static["schedule"], "update": state.update},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(self.step.device),
            "state": position,
            "metrics": state.rows,
            "events": state.events,
            **static,
        }
        save_checkpoint(self.folder / "last.pt", saved)
        if best:
            save_checkpoint(self.folder / "best.pt", saved)
        summary = {k: static[k] for k in ("model_name", "classes", "config")}
        write_metrics(self.folder, state.rows, {**summary, "best_top1": state.best_top1, "events": state.events})


# --- the loop ---------------------------------------------------------------------------------------------


def _loop(run: _Run, state: _State) -> bool:
    """Train until the last epoch (False) or ``stop_after`` updates in this call (True)."""
    updates_here, on_oom = 0, partial(_record_oom, state, run.display)
    run.display.start_epoch(state.epoch, run.epochs, run.steps_per_epoch, state.batches_done)
    while True:
        lr = set_lr(run.step.optimizer, run.lr(state.update))
        if state.batches_done == run.steps_per_epoch:
            _end_epoch(run, state)
            if state.epoch == run.epochs:
                return False
        elif run.checkpoint_every and state.batches_done and state.update % run.checkpoint_every == 0:
            run.save(state, False)
        if updates_here == run.stop_after:
            run.save(state, False)
            run.display.close()
            return True
        started = time.perf_counter()
        images, labels = next(run.batches)
        checkpoint.hold()  # a Ctrl-C from here waits for the update to finish: never save half of one
        with _first_updates_measured(run.backend, state, len(images)):
            loss, state.micro_batch_size = forward_backward_retrying(
                run.step, run.backend, images, labels, state.micro_batch_size, on_oom
            )
            run.step.update()  # the optimizer step, then zero_grad(set_to_none=True)
        if run.empty_cache_every and (state.update + 1) % run.empty_cache_every == 0:
            run.backend.clear_cache()
        loss_value = loss.item()  # waits for the device, so the update's time includes its GPU work
        elapsed = time.perf_counter() - started
        state.update, state.batches_done, state.lr = state.update + 1, state.batches_done + 1, lr
        state.epoch_loss_sum, state.epoch_train_s = state.epoch_loss_sum + loss_value, state.epoch_train_s + elapsed
        updates_here += 1
        checkpoint.release()  # raises the held Ctrl-C, if any: `train` saves this position
        run.display.step(loss_value, len(images) / elapsed, memory_bytes(run.backend))


MEASURED_UPDATES = 5
"""The first updates of a run are measured: their peak is the ``measured_peak`` event, beside the probe's."""


@contextmanager
def _first_updates_measured(backend: MemoryBackend, state: _State, images: int) -> Iterator[None]:
    """Measure the peak of the run's first `MEASURED_UPDATES` updates: the ``measured_peak`` event, kept current."""
    if len(state.first_peaks) >= MEASURED_UPDATES:
        yield
        return
    with backend.measure() as window:
        yield
    peaks = state.first_peaks
    peaks.append((window.peak_bytes, window.allocated_bytes))
    event = {
        "event": "measured_peak",
        "updates": len(peaks),
        "micro_batch_size": state.micro_batch_size,
        "effective_batch_size": images,
        "peak_bytes": max((p for p, _ in peaks if p is not None), default=None),
        "allocated_bytes": max((a for _, a in peaks if a is not None), default=None),
    }
    state.events[:] = [e for e in state.events if e["event"] != "measured_peak"] + [event]


def _record_oom(state: _State, display: Display, micro: int, new_micro: int, message: str) -> None:
    steps = len(micro_batch_sizes(state.effective_batch_size, new_micro))
    state.epoch_ooms += 1
    state.events.append(
        {
            "event": "oom",
            "epoch": state.epoch + 1,
            "update": state.update,
            "micro_batch_size": micro,
            "new_micro_batch_size": new_micro,
            "accumulation_steps": steps,
            "effective_batch_size": state.effective_batch_size,
            "error": message,
        }
    )
    display.print(
        f"Out of memory at micro-batch {micro} (epoch {state.epoch + 1}, update {state.update}): re-running the "
        f"same batch as {steps} micro-batches of up to {new_micro}; the effective batch stays "
        f"{state.effective_batch_size}."
    )


def _record_eval_oom(state: _State, backend: MemoryBackend, display: Display, size: int, message: str) -> int:
    """After an out-of-memory error while evaluating: free it, halve the evaluation batch (only), say so."""
    backend.release_failed_step()
    if size == 1:
        raise TrainingOutOfMemory(
            f"Out of memory evaluating a single image: {message} Pass a smaller --image-size or model, or a larger "
            "--memory-limit."
        )
    new = size // 2
    state.eval_batch_size = new
    state.events.append(
        {
            "event": "eval_oom",
            "epoch": state.epoch + 1,
            "update": state.update,
            "eval_batch_size": size,
            "new_eval_batch_size": new,
            "micro_batch_size": state.micro_batch_size,
            "effective_batch_size": state.effective_batch_size,
            "error": message,
        }
    )
    display.print(
        f"Out of memory evaluating batches of {size} (epoch {state.epoch + 1}): evaluating in batches of {new}; "
        f"training keeps micro-batch {state.micro_batch_size} and batch {state.effective_batch_size}."
    )
    return new


def _end_epoch(run: _Run, state: _State) -> None:
    metrics = run.evaluate(state)
    checkpoint.hold()  # the epoch's row, position and checkpoint change together or not at all
    _, ranks = distributed.rank_and_world()
    steps, effective = run.steps_per_epoch, state.effective_batch_size
    row: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "update": state.update,
        "lr": state.lr,
        "train_loss": state.epoch_loss_sum / steps,
        "val_loss": metrics["loss"],
        "val_top1": metrics["top1"],
        "val_top5": metrics["top5"],
        # Every rank trained on its own `effective` samples per update, in the same time.
        "images_per_s": steps * effective * ranks / state.epoch_train_s if state.epoch_train_s else 0.0,
        "epoch_s": state.epoch_train_s,
        "micro_batch_size": state.micro_batch_size,
        "eval_batch_size": state.eval_batch_size or state.micro_batch_size,
        "accumulation_steps": len(micro_batch_sizes(effective, state.micro_batch_size)),
        "effective_batch_size": effective,
        "oom_retries": state.epoch_ooms,
        "skipped_images": run.splits.skipped,
        "memory_bytes": memory_bytes(run.backend),
    }
    best = state.best_top1 is None or row["val_top1"] > state.best_top1
    state.rows.append(row)
    state.best_top1 = row["val_top1"] if best else state.best_top1
    state.epoch, state.batches_done = state.epoch + 1, 0
    state.epoch_loss_sum, state.epoch_train_s, state.epoch_ooms = 0.0, 0.0, 0
    run.save(state, best)
    checkpoint.release()
    run.display.end_epoch(row, run.epochs, best)
    if state.epoch < run.epochs:
        run.display.start_epoch(state.epoch, run.epochs, run.steps_per_epoch, 0)


def _stopped(run: _Run, state: _State, folder: Path) -> checkpoint.TrainingInterrupted:
    """After a Ctrl-C: last.pt at the last whole update (unless it came mid-update), as the exception to raise."""
    batches = f"{state.batches_done} of {run.steps_per_epoch} batches done"
    where = f"update {state.update} (epoch {state.epoch + 1}, {batches})"
    return checkpoint.stop(partial(run.save, state, False), folder / "last.pt", where)


# --- setup ------------------------------------------------------------------------------------------------


def _restore(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> _State:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return _State(**saved["state"], rows=list(saved["metrics"]), events=list(saved["events"]))


def _make_run(
    config: TrainConfig,
    splits: Any,
    model: nn.Module,
    step: TrainingStep,
    backend: MemoryBackend,
    state: _State,
    display: Display,
    data_config: dict[str, Any],
) -> _Run:
    # A simulated Mac starts workers as macOS does (spawn), which also keeps the simulation's tensor
    # tracking out of them.
    rank, ranks = distributed.rank_and_world()
    options: dict[str, Any] = {
        "workers": config.workers,
        "pin_memory": backend.pins_memory,
        "spawn": config.simulate is not None,
        "rank": rank,
        "ranks": ranks,
    }
    loader, sampler = make_train_loader(splits.train, state.effective_batch_size, seed=config.seed, **options)
    steps = sampler.batches_per_epoch()
    total = steps * config.epochs
    warmup = min(round(config.warmup_epochs * steps), total)
    static = {
        "config": config.to_dict(),
        "classes": list(splits.classes),
        "model_name": config.model,
        "data_config": {"image_size": config.image_size, **{k: data_config[k] for k in ("mean", "std", "crop_pct")}},
        "schedule": {"peak_lr": config.peak_lr, "warmup_updates": warmup, "total_updates": total},
    }
    every = config.empty_cache_every

    def make_val(batch_size: int) -> DataLoader:
        return eval_loader(splits.val, batch_size, **options)

    return _Run(
        model=model,
        step=step,
        backend=backend,
        batches=train_batches(loader, sampler, state.epoch, state.batches_done),
        val=make_val(state.eval_batch_size or state.micro_batch_size),
        splits=splits,
        steps_per_epoch=steps,
        epochs=config.epochs,
        empty_cache_every=every if every is not None else backend.empty_cache_every,
        checkpoint_every=config.checkpoint_every,
        stop_after=config.stop_after,
        folder=config.output_dir if rank == 0 else None,
        static=static,
        display=display,
        eval_sizing=config.eval_sizing,
        make_val=make_val,
        probe_eval=partial(probe_evaluation, step, model, backend, config, len(splits.val) // ranks or 1),
    )


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    display: Display | None = None,
) -> TrainResult:
    """Train an image classifier with a batch size that fits, writing metrics and checkpoints to the run folder.

    With ``batch_size="auto"`` the micro-batch is probed on the trainer's own step: this model as it trains
    (channels_last, the DDP wrapper under torchrun), its loss (label smoothing), optimizer, scaler and
    gradient averaging, restored bit for bit afterwards; on MPS the memory cap stays set during training;
    an out-of-memory error mid-run
    halves the micro-batch and re-runs the same batch with more accumulation (see `engine`). The run
    folder gets metrics.csv, metrics.json, last.pt and best.pt; ``config.resume`` continues from last.pt
    exactly (same weights as an uninterrupted run).

    Args:
        config: the run's settings.
        model: train this module instead of ``timm.create_model(config.model)`` (evaluate/predict need
            a timm name to rebuild it).
        display: progress and per-epoch lines (default: rich on stderr, bars only on a terminal).

    Returns:
        A `TrainResult` with the metrics rows and events.

    Raises:
        ValueError: a bad setting, a dataset too small for the batch, or a run folder that does not
            match ``resume``.
        TrainingOutOfMemory: a batch did not fit even after `MAX_OOM_RETRIES` halvings.
        TrainingInterrupted: Ctrl-C (a KeyboardInterrupt), after saving last.pt at the last whole update
            (``resume`` continues from there exactly); its message says what was saved.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     config = TrainConfig(dataset="synthetic", model="test_efficientnet", image_size=32, epochs=1,
        ...                          batch_size=8, effective_batch_size=16, dev_samples=32, workers=0, output=tmp)
        ...     result = train(config, display=Display(quiet=True))
        >>> len(result.epochs), result.updates, result.epochs[0]["accumulation_steps"]
        (1, 2, 2)
    """
    backend = get_backend(resolve_device(config))
    started_group, backend = distributed.init_from_env(backend)  # under torchrun: DDP, on this rank's device
    try:
        result = _train(config, backend, model, display)
        if started_group:
            torch.distributed.barrier()  # no rank tears the group down while another still uses it
        return result
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def _sync_batchnorm(model: nn.Module, backend: MemoryBackend) -> nn.Module:
    if not backend.syncs_batchnorm:
        raise ValueError(
            "--sync-bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only). Drop it: on CPU each rank "
            "keeps BatchNorm statistics of its own share of the batch."
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Broadcasts rank 0's parameters and buffers; gradients are averaged in `forward_backward_retrying`.
    # A module on one indexed device (a GPU) names it; a CPU module names none.
    return DistributedDataParallel(model, device_ids=[device] if device.index is not None else None)


def _train(
    config: TrainConfig, backend: MemoryBackend, model: nn.Module | None, display: Display | None
) -> TrainResult:
    rank, ranks = distributed.rank_and_world()
    display = display if display is not None else Display()
    if rank != 0:
        display = Display(quiet=True)  # rank 0 reports; the others would print the same lines again
    saved = prepare_output(config)
    amp = backend.choose_amp(config.amp)
    data_config = model_data_config(model if model is not None else config.model)
    splits = load_splits(config, data_config)
    seed_everything(config.seed)
    if model is None:
        model = create_model(
            config.model, len(splits.classes), pretrained=config.use_pretrained, weights=config.weights
        )
    channels_last = backend.prefers_channels_last
    n_train = len(splits.train) // ranks  # this rank's share of every epoch
    memory_limit = parse_size(config.memory_limit) if config.memory_limit is not None else None
    with memory_session(backend, memory_limit):
        model.to(backend.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if config.sync_bn and ranks > 1:
            model = _sync_batchnorm(model, backend)
        optimizer = make_optimizer(config.optimizer, model, lr=config.peak_lr, weight_decay=config.weight_decay)
        scaler = torch.amp.GradScaler(backend.device.type) if amp == "fp16" and backend.uses_grad_scaler else None
        if saved is not None:
            state = _restore(saved, model, optimizer, scaler)
        net = _data_parallel(model, backend.device) if ranks > 1 else model  # after loading: rank 0's weights win
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        step = TrainingStep(
            net, optimizer, loss_fn, amp=amp, scaler=scaler, channels_last=channels_last, device=backend.device
        )
        probe = None
        if saved is None:
            if config.batch_size == "auto":
                probe = probe_training_step(step, model, backend, config, len(splits.classes), n_train)
                display.probe(probe)
            micro, effective, event = choose_batch_sizes(config, probe, n_train)
            fixed_eval = config.eval_sizing if isinstance(config.eval_sizing, int) else None
            state = _State(micro, effective, fixed_eval, events=[event] if event else [])
        run = _make_run(config, splits, model, step, backend, state, display, data_config)
        if saved is not None:
            set_rng_state(saved["rng"], backend.device)  # last: building the run may have drawn random numbers
        try:
            with checkpoint.deferred():
                try:
                    stopped = state.epoch < config.epochs and _loop(run, state)
                except KeyboardInterrupt:
                    display.close()
                    raise _stopped(run, state, config.output_dir) from None
        finally:
            display.close()
    return TrainResult(
        output_dir=config.output_dir,
        epochs=tuple(state.rows),
        events=tuple(state.events),
        best_top1=state.best_top1,
        micro_batch_size=state.micro_batch_size,
        effective_batch_size=state.effective_batch_size,
        updates=state.update,
        stopped=stopped,
        probe=probe,
        eval_batch_size=state.eval_batch_size or (state.micro_batch_size if state.rows else None),
        eval_probe=run.eval_probe,
    )


# --- one update ----------------------------------------------------------------------------------------------
# One optimizer update's pieces: micro-batch forward/backward with out-of-memory recovery, the step, evaluation.

MAX_OOM_RETRIES = 3
"""Halvings of the micro-batch tried for one optimisation batch before giving up."""


class TrainingOutOfMemory(AutobatchError):
    """An optimisation batch ran out of memory even after `MAX_OOM_RETRIES` halvings of the micro-batch."""


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _forward_backward(step: TrainingStep, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
    """Accumulate the gradient of the batch's mean loss; each micro-batch weighted by its share of the batch."""
    total, start, loss_sum = len(images), 0, None
    for size in micro_batch_sizes(total, micro):
        loss = step.loss(images[start : start + size], labels[start : start + size]) * (size / total)
        step.backward(loss)
        # Summed on the device: reading it (a sync point) is left to the log step, once per update.
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        start += size
    assert loss_sum is not None  # a batch has at least one sample
    return loss_sum


def _agreed_forward_backward(
    step: TrainingStep, images: torch.Tensor, labels: torch.Tensor, micro: int
) -> torch.Tensor:
    """`_forward_backward` on every rank, or an error on every rank; gradients averaged once all succeeded.

    Under DDP (``step.model`` a `DistributedDataParallel`) the pass accumulates gradients locally
    (``no_sync``) and the ranks vote on its outcome before any gradient is reduced: syncing inside
    ``backward()`` would leave the other ranks waiting in its all-reduce for a rank that had already failed.
    """
    accumulate = step.model.no_sync if isinstance(step.model, DistributedDataParallel) else nullcontext
    error, loss = None, None
    try:
        with accumulate():
            loss = _forward_backward(step, images, labels, micro)
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)  # its frames pin the failed pass's activations
        error = exc
    distributed.agree_on_outcome(error, "the training step")
    distributed.average_gradients(step.model.parameters())
    assert loss is not None
    return loss


def one_update(step: TrainingStep, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One whole optimizer update on one batch, exactly as the loop runs it at a micro-batch of the whole batch.

    This is the step ``--batch-size auto`` probes: the trainer's model (channels_last, the DDP wrapper), its
    loss, optimizer, scaler and gradient averaging, on every rank in lockstep.
    """
    _agreed_forward_backward(step, images, labels, len(images))
    step.update()


def forward_backward_retrying(
    step: TrainingStep,
    backend: MemoryBackend,
    images: torch.Tensor,
    labels: torch.Tensor,
    micro: int,
    on_oom: Callable[[int, int, str], None],
) -> tuple[torch.Tensor, int]:
    """`_agreed_forward_backward`, re-run on the same batch with half the micro-batch after an out-of-memory error.

    A failed pass leaves partial gradients, moved BatchNorm running statistics and advanced RNGs: all three
    are put back before the re-run, so it computes what a run at the smaller micro-batch would have. A rank
    that runs out of memory makes every rank halve together; one that fails otherwise stops them all.
    """
    rewind, first = Rewind(step.model, backend.device), micro
    for retry in range(MAX_OOM_RETRIES + 1):
        try:
            return _agreed_forward_backward(step, images, labels, micro), micro
        except Exception as exc:
            if not is_oom_error(exc):
                if not isinstance(exc, AutobatchError):  # another rank's failure is already said as such
                    mark_failed_step(exc, f"at micro-batch {micro}")
                raise
            # The allocator's numbers, without MPS's hint to lift the limit (the cap is there on purpose).
            message = str(exc).splitlines()[0].split(" Use PYTORCH_MPS_HIGH_WATERMARK_RATIO")[0]
        # Outside the except block: the traceback, and the activations its frames pinned, are gone.
        step.model.zero_grad(set_to_none=True)
        rewind.restore()
        backend.clear_cache()
        if retry == MAX_OOM_RETRIES or micro == 1:
            break
        on_oom(micro, max(micro // 2, 1), message)
        micro = max(micro // 2, 1)
    raise TrainingOutOfMemory(
        f"Out of memory even at micro-batch {micro} (from {first}, after {MAX_OOM_RETRIES} halvings at most): "
        f"{message} Pass a smaller --image-size or model, or a larger --memory-limit."
    )


def _score(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    amp: str | None,
    channels_last: bool,
) -> torch.Tensor:
    """(summed cross-entropy, top-1 hits, top-5 hits) of one batch, on the CPU."""
    logits = evaluation_output(model, images, device=device, amp=amp, channels_last=channels_last).float()
    labels = labels.to(device, non_blocking=True)
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    return torch.stack([loss, hits[:, 0].sum(), hits.any(dim=1).sum()]).cpu()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp: str | None = None,
    channels_last: bool = False,
    batch_size: int | None = None,
    on_oom: Callable[[int, str], int] | None = None,
) -> dict[str, float]:
    """Mean cross-entropy (no smoothing), top-1 and top-5 accuracy (fractions) over a loader.

    ``batch_size`` splits the loader's batches further (the trainer's evaluation batch). With ``on_oom``, an
    out-of-memory error re-scores the same images in the batch size ``on_oom(size, message)`` returns.
    """
    was_training = model.training
    model.eval()
    totals, count = torch.zeros(3, dtype=torch.float64), 0
    for images, labels in loader:
        size, start = batch_size or len(images), 0
        while start < len(images):
            chunk = slice(start, start + size)
            try:
                totals += _score(model, images[chunk], labels[chunk], device, amp, channels_last)
            except Exception as exc:
                if on_oom is None or not is_oom_error(exc):
                    raise
                traceback.clear_frames(exc.__traceback__)  # its frames pin the failed forward's activations
                message = first_line(exc).split(" Use PYTORCH_MPS_HIGH_WATERMARK_RATIO")[0]
                del exc
                size = batch_size = on_oom(size, message)  # for this batch and every later one
                continue
            start += size
        count += len(labels)
    model.train(was_training)
    # Under torchrun each rank scored its share of the split (`eval_loader`): add them up.
    summed = distributed.sum_over_ranks(torch.cat([totals, torch.tensor([float(count)], dtype=totals.dtype)]))
    loss, top1, top5, images = summed.tolist()
    loss, top1, top5 = (value / max(images, 1) for value in (loss, top1, top5))
    return {"loss": loss, "top1": top1, "top5": top5, "images": int(images)}


def probe_training_step(
    step: TrainingStep,
    model: nn.Module,
    backend: MemoryBackend,
    config: TrainConfig,
    num_classes: int,
    n_train: int,
) -> ProbeResult:
    """Probe the run's own step: `one_update` on a synthetic batch of the run's images and classes.

    Every rank runs the same trials in lockstep (the step votes before it averages gradients); the model,
    the optimizer and the scaler are put back bit for bit afterwards, and the run's random stream is left as
    it was. The answer is cached under the model name, the step's settings and the device when
    ``config.probe_cache`` is on.
    """
    from ..probe import find_safe_batch_size

    shape = (3, config.image_size, config.image_size)

    def one_training_update(batch_size: int) -> None:
        # On the host, as the DataLoader hands them over; the step moves them to the device.
        images = torch.randn(batch_size, *shape)
        labels = torch.randint(num_classes, (batch_size,))
        one_update(step, images, labels)

    _, ranks = distributed.rank_and_world()
    requested = config.effective_batch_size
    spec = ProbeSpec(
        model=f"{config.model} (autobatch train step: label smoothing {config.label_smoothing}, {ranks} ranks)",
        input_shape=shape,
        num_classes=num_classes,
        optimizer=config.optimizer,
        amp=step.amp,  # type: ignore[arg-type]
        channels_last=step.channels_last,
        memory_limit=parse_size(config.memory_limit) if config.memory_limit is not None else None,
        requested=requested,
        max_batch_size=min(requested or n_train, n_train),
        steps_per_trial=2,
    )
    scaler_state = step.scaler.state_dict() if step.scaler is not None else None
    with fork_rng(backend.device):  # the probe's batches and dropout must not move the run's random streams
        result = find_safe_batch_size(
            one_training_update,
            spec=spec,
            device=backend,
            model=model,
            optimizer=step.optimizer,
            cache=config.probe_cache,
            cache_key=spec.model,
        )
    if step.scaler is not None and scaler_state is not None:
        step.scaler.load_state_dict(scaler_state)
    return result


def probe_evaluation(
    step: TrainingStep, model: nn.Module, backend: MemoryBackend, config: TrainConfig, n_val: int
) -> ProbeResult:
    """Probe the run's own evaluation forward (`evaluation_output`, the model in eval mode) on synthetic images.

    Run at the first evaluation, after training updates: the optimizer state and whatever else the run holds are
    in memory, as at every evaluation. Cached like the training probe when ``config.probe_cache`` is on.
    """
    from ..probe import find_safe_batch_size

    shape = (3, config.image_size, config.image_size)

    def one_evaluation(batch_size: int) -> None:
        images = torch.randn(batch_size, *shape)  # on the host, as the loader hands them over
        evaluation_output(model, images, device=step.device, amp=step.amp, channels_last=step.channels_last)

    _, ranks = distributed.rank_and_world()
    spec = ProbeSpec(
        model=f"{config.model} (autobatch evaluation, {ranks} ranks)",
        input_shape=shape,
        mode="eval",
        amp=step.amp,  # type: ignore[arg-type]
        channels_last=step.channels_last,
        memory_limit=parse_size(config.memory_limit) if config.memory_limit is not None else None,
        max_batch_size=n_val,
    )
    was_training = model.training
    model.eval()
    try:
        with fork_rng(backend.device):
            return find_safe_batch_size(
                one_evaluation, spec=spec, device=backend, model=model, cache=config.probe_cache, cache_key=spec.model
            )
    finally:
        model.train(was_training)
