"""The training loop, read like nanoGPT's ``train.py``: setup, then one loop in a fixed order.

Each pass of the loop: set the learning rate → evaluate and checkpoint at an epoch end (or when asked)
→ forward/backward over the micro-batches → optimizer step → ``zero_grad(set_to_none=True)`` → release
the allocator's cache every K updates → log. One pass is one optimizer update on one optimisation batch
(``effective_batch_size`` samples); on an out-of-memory error the same batch is re-run in smaller
micro-batches, so no sample is skipped and the update is the same one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from .._units import parse_size
from ..accumulation import micro_batch_sizes
from ..devices import MemoryBackend, get_backend
from ..results import ProbeResult
from ..step import TrainingStep, rng_state, set_rng_state
from . import _interrupts
from ._display import Display, memory_bytes
from ._loaders import eval_loader, load_splits, train_batches
from ._loaders import train_loader as make_train_loader
from ._setup import (
    choose_batch_sizes,
    create_model,
    lr_at,
    make_optimizer,
    memory_session,
    model_data_config,
    prepare_output,
    probe_training_step,
    resolve_device,
    seed_everything,
)
from ._steps import (
    MAX_OOM_RETRIES,
    TrainingOutOfMemory,
    evaluate,
    forward_backward_retrying,
    set_lr,
)
from .checkpoint import save_checkpoint, write_metrics
from .config import TrainConfig

__all__ = ["MAX_OOM_RETRIES", "TrainResult", "TrainingOutOfMemory", "evaluate", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a run did. ``epochs`` are the metrics rows (`checkpoint.METRIC_COLUMNS`); ``events`` the probe
    and out-of-memory recoveries, and ``measured_peak``, the peak of the first updates; ``stopped`` is True when
    ``stop_after`` ended it before the last epoch; ``probe`` is the probe's result for ``batch_size="auto"``."""

    output_dir: Path
    epochs: tuple[dict[str, Any], ...]
    events: tuple[dict[str, Any], ...]
    best_top1: float | None
    micro_batch_size: int
    effective_batch_size: int
    updates: int
    stopped: bool
    probe: ProbeResult | None = None


@dataclass
class _State:
    """Everything that changes as the run goes; all of it is in every checkpoint."""

    micro_batch_size: int
    effective_batch_size: int
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
    """What the loop reads, built once in `train`."""

    step: TrainingStep
    evaluate: Callable[[int], dict[str, float]]
    backend: MemoryBackend
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    steps_per_epoch: int
    epochs: int
    schedule: Callable[[int], float]
    empty_cache_every: int
    checkpoint_every: int
    stop_after: int | None
    skipped: Callable[[], int]
    save: Callable[[_State, bool], None]
    display: Display


# --- the loop ---------------------------------------------------------------------------------------------


def _loop(run: _Run, state: _State) -> bool:
    """Train until the last epoch (False) or ``stop_after`` updates in this call (True)."""
    updates_here, on_oom = 0, partial(_record_oom, state, run.display)
    run.display.start_epoch(state.epoch, run.epochs, run.steps_per_epoch, state.batches_done)
    while True:
        lr = set_lr(run.step.optimizer, run.schedule(state.update))
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
        _interrupts.hold()  # a Ctrl-C from here waits for the update to finish: never save half of one
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
        _interrupts.release()  # raises the held Ctrl-C, if any: `train` saves this position
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


def _end_epoch(run: _Run, state: _State) -> None:
    metrics = run.evaluate(state.micro_batch_size)
    _interrupts.hold()  # the epoch's row, position and checkpoint change together or not at all
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
        "accumulation_steps": len(micro_batch_sizes(effective, state.micro_batch_size)),
        "effective_batch_size": effective,
        "oom_retries": state.epoch_ooms,
        "skipped_images": run.skipped(),
        "memory_bytes": memory_bytes(run.backend),
    }
    best = state.best_top1 is None or row["val_top1"] > state.best_top1
    state.rows.append(row)
    state.best_top1 = row["val_top1"] if best else state.best_top1
    state.epoch, state.batches_done = state.epoch + 1, 0
    state.epoch_loss_sum, state.epoch_train_s, state.epoch_ooms = 0.0, 0.0, 0
    run.save(state, best)
    _interrupts.release()
    run.display.end_epoch(row, run.epochs, best)
    if state.epoch < run.epochs:
        run.display.start_epoch(state.epoch, run.epochs, run.steps_per_epoch, 0)


def _stopped(run: _Run, state: _State, folder: Path) -> _interrupts.TrainingInterrupted:
    """After a Ctrl-C: last.pt at the last whole update (unless it came mid-update), as the exception to raise."""
    batches = f"{state.batches_done} of {run.steps_per_epoch} batches done"
    where = f"update {state.update} (epoch {state.epoch + 1}, {batches})"
    return _interrupts.stop(partial(run.save, state, False), folder / "last.pt", where)


# --- setup ------------------------------------------------------------------------------------------------


def _restore(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> _State:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return _State(**saved["state"], rows=list(saved["metrics"]), events=list(saved["events"]))


def _saver(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, static: dict[str, Any]
) -> Callable[[_State, bool], None]:
    """``save(state, best)``: last.pt (and best.pt), then the metrics files, all atomically."""
    device = next(model.parameters()).device

    def save(state: _State, best: bool) -> None:
        position = {k: v for k, v in dataclasses.asdict(state).items() if k not in ("rows", "events")}
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {**static["schedule"], "update": state.update},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(device),
            "state": position,
            "metrics": state.rows,
            "events": state.events,
            **static,
        }
        save_checkpoint(folder / "last.pt", checkpoint)
        if best:
            save_checkpoint(folder / "best.pt", checkpoint)
        summary = {k: static[k] for k in ("model_name", "classes", "config")}
        write_metrics(folder, state.rows, {**summary, "best_top1": state.best_top1, "events": state.events})

    return save


def _no_save(state: _State, best: bool) -> None:
    """Ranks other than 0 write nothing: rank 0's checkpoint and metrics hold the same weights and numbers."""


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
    device, amp, channels_last = backend.device, step.amp, step.channels_last
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
    val = eval_loader(splits.val, state.micro_batch_size, **options)
    every = config.empty_cache_every
    return _Run(
        step=step,
        evaluate=lambda micro: evaluate(
            model, val, device=device, amp=amp, channels_last=channels_last, batch_size=micro
        ),
        backend=backend,
        batches=train_batches(loader, sampler, state.epoch, state.batches_done),
        steps_per_epoch=steps,
        epochs=config.epochs,
        schedule=partial(lr_at, peak=config.peak_lr, warmup=warmup, total=total),
        empty_cache_every=every if every is not None else backend.empty_cache_every,
        checkpoint_every=config.checkpoint_every,
        stop_after=config.stop_after,
        skipped=lambda: splits.skipped,
        save=_saver(config.output_dir, model, step.optimizer, step.scaler, static) if rank == 0 else _no_save,
        display=display,
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
            state = _State(micro, effective, events=[event] if event else [])
        run = _make_run(config, splits, model, step, backend, state, display, data_config)
        if saved is not None:
            set_rng_state(saved["rng"], backend.device)  # last: building the run may have drawn random numbers
        try:
            with _interrupts.deferred():
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
    )
