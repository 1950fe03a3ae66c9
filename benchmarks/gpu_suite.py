"""Batch-size finders compared on a real CUDA GPU, and the bundled trainer's throughput against a compute-only loop.

    python -m benchmarks.gpu_suite [--out DIR] [--budget-s 250] [--limit-gib 8]   # writes DIR/gpu_suite.{json,md}
    python -m benchmarks.gpu_suite --cpu-smoke    # the same code paths on the CPU, tiny, into a temporary folder
    bash benchmarks/gpu_suite.sh "$OUT" 250       # on the lent GPU machine: installs benchmarks/wheels/ if needed

Finder cases: each model @ image size runs under a real limit set by ``torch.cuda.set_per_process_memory_fraction``
(``limit / total``): exhaustive truth (doubling + bisection of real steps), ours (default settings, and
``find_max=True``), Lightning's ``Tuner.scale_batch_size`` (power, binsearch), Accelerate's
``find_executable_batch_size`` from 512 and an Ultralytics-style estimate; each chosen size is then followed up by
20 training steps, a short last batch and an eval pass under the same limit. All in fp32 (ours' default ``amp=None``;
Lightning ``precision="32-true"``), with PyTorch's default TF32 flags (recorded in the report).

Trainer case: the bundled trainer (`mps_autobatch.train.engine.train`, dataset "synthetic", its CUDA defaults:
bf16 autocast, channels_last, pinned memory) at the batch size its own probe (ours) finds under the same limit,
timed over its steady state, against a compute-only loop (same model, batch, precision and memory format, inputs
already on the GPU, no data loading). Results are written after every finder and every case, so a run killed at its
time limit keeps what it measured; cases that would not fit the remaining budget are recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import timm
import torch
from torch import nn
from torch.utils.data import Dataset

from benchmarks.compare_finders import (
    Case,
    _first_line,
    _lit_module,
    accelerate,
    finder_table,
    follow_up,
    lightning_trainer,
    ours,
    search_truths,
)
from mps_autobatch.devices import CUDABackend, MemoryBackend
from mps_autobatch.oom import is_oom_error
from mps_autobatch.simulate import SimulatedMPS, SimulatedMPSBackend
from mps_autobatch.workload import make_workload

RESULTS = Path(__file__).parent / "results"
GiB, MiB = 2**30, 2**20
# 8 GiB: in fp32 at 224 px it puts the budget truth at roughly 50-200 samples for the three models, so one step
# is ~0.05-0.2 s on an H100 and a whole search is a few seconds; three models, the follow-ups and the trainer case
# then fit the 5-minute budget. 16 GiB would double every step and add a doubling to every power search. It is
# also a realistic budget: a 8 GB consumer card, or the share a Mac leaves a training run.
LIMIT_GIB = 8.0
DEFAULT_BUDGET_S = 250.0
SMOKE_LIMIT = 128 * MiB  # the simulated device holds 64 MiB of its own (Metal, MPSGraph) from the start
SIM_TOTAL = 16 * GiB  # the simulated device of --cpu-smoke (compute on the CPU, CUDA error texts)
# Finder cases in priority order: what runs first survives a short budget. The trainer case runs after the first.
GPU_FINDER_CASES = [
    ("efficientnet_b0", 224),
    ("resnet50", 224),
    ("vit_small_patch16_224", 224),
    ("efficientnet_b0", 384),
    ("resnet50", 384),
    ("vit_small_patch16_224", 384),
]
# 64 px, not 32: at 32 px test_efficientnet's last feature map is 1x1, so a batch of 1 (the Ultralytics-style fit,
# a bisection's low end) fails in BatchNorm ("Expected more than 1 value per channel") before any memory question.
SMOKE_FINDER_CASES = [("test_efficientnet", 64)]
# Seconds a case is expected to take (started only when this much budget is left); 384 px costs about 3x 224.
ESTIMATE_S = {"finders@224": 60.0, "finders@384": 90.0, "trainer": 75.0}
SYNTHETIC_TRAIN = 1_000_000  # training images of the enlarged synthetic split (generated lazily)


class Settings:
    """What differs between the GPU run and the CPU smoke run; the code paths are the same."""

    def __init__(self, smoke: bool, limit_gib: float, budget_s: float) -> None:
        self.smoke = smoke
        self.kind = "sim" if smoke else "cuda"
        self.limit_bytes = SMOKE_LIMIT if smoke else int(limit_gib * GiB)
        self.budget_s = budget_s
        self.finder_cases = SMOKE_FINDER_CASES if smoke else GPU_FINDER_CASES
        self.trainer_model, self.trainer_size = ("test_efficientnet", 32) if smoke else ("efficientnet_b0", 224)
        self.trainer_limit = "48MiB" if smoke else f"{limit_gib:g}GiB"
        self.warm_updates, self.measured_updates = (2, 3) if smoke else (20, 200)
        self.workers = 1 if smoke else max(1, min(14, (os.cpu_count() or 2) - 2))
        self.started = psutil.Process().create_time()  # the budget counts the interpreter's start and imports

    def elapsed(self) -> float:
        return time.time() - self.started

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()


# --- one finder case -------------------------------------------------------------------------------------------
class GPUCase(Case):
    """A model @ image size under a limit, on CUDA (the fraction) or, for --cpu-smoke, a simulated device."""

    def __init__(self, model: str, image_size: int, limit_bytes: int, kind: str) -> None:
        super().__init__(model, image_size, limit_bytes / GiB)
        self.limit, self.budget = limit_bytes, int(limit_bytes * 0.8)
        self.kind = kind

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        extra = {"img_size": self.image_size} if "vit" in self.model_name else {}
        return timm.create_model(self.model_name, num_classes=1000, **extra)

    def backend(self, style: str = "cuda") -> MemoryBackend:  # type: ignore[override]
        if self.kind == "cuda":
            return CUDABackend("cuda")
        return SimulatedMPSBackend(SimulatedMPS(SIM_TOTAL, error_style="cuda"))

    @contextlib.contextmanager
    def limited(self, backend: MemoryBackend) -> Iterator[None]:
        """The limit while a peer runs: the per-process fraction on CUDA; tracking plus the cap when simulated
        (tracking from outside the session too, as compare_finders runs Lightning)."""
        with contextlib.ExitStack() as stack:
            if isinstance(backend, SimulatedMPSBackend):
                stack.enter_context(backend.sim.tracking())
            stack.enter_context(backend.session(self.limit))
            yield


def _release() -> dict[str, float]:
    """Free what the last finder left: collect, empty the CUDA cache, reset the peaks; report what stays."""
    gc.collect()
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {
        "allocated_after_mib": round(torch.cuda.memory_allocated() / MiB, 1),
        "reserved_after_mib": round(torch.cuda.memory_reserved() / MiB, 1),
    }


def truths(case: GPUCase) -> dict[str, Any]:
    """Max truth (doubling + bisection of real steps) and budget truth (largest measured peak <= 0.8 x limit).

    The peak is the backend's: on CUDA ``max_memory_reserved`` after ``empty_cache`` and ``reset_peak_memory_stats``.
    One step's time is the mean of 3 steps at the budget truth with a warm cache, synchronized.
    """
    backend = case.backend()
    with make_workload(case.model(), device=backend.device, input_shape=case.shape) as workload:
        with backend.session(case.limit):
            max_truth, budget_truth, step = search_truths(case, backend, workload)
            size = max(budget_truth, 1)
            backend.clear_cache()
            workload.step(size)
            backend.synchronize()
            began = time.perf_counter()
            for _ in range(3):
                workload.step(size)
            backend.synchronize()
            step_s = (time.perf_counter() - began) / 3
    return {
        "max_truth": max_truth,
        "budget_truth": budget_truth,
        "peak_mib_at_budget_truth": round((step.seen.get(budget_truth, (0,))[0] or 0) / MiB, 1),
        "step_s_at_budget_truth": round(step_s, 4),
        "truth_steps": len(step.seen) + 4,
    }


class _Fixed(Dataset):
    """One random sample repeated: data costs next to nothing, so a finder's wall time is its search."""

    def __init__(self, shape: tuple[int, ...], length: int = 100_000) -> None:
        self.sample, self.length = torch.randn(shape), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.sample, index % 1000


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def lightning(case: GPUCase, mode: str) -> dict[str, Any]:
    """Lightning's Tuner.scale_batch_size (init 2, 3 steps per trial) on a minimal module, fp32."""
    from lightning.pytorch.tuner import Tuner

    _quiet_lightning()  # after the import: importing lightning.pytorch sets its logger to INFO
    counter = [0]

    backend = case.backend()
    module = _lit_module(case, counter, _Fixed)
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning_trainer(root, "gpu" if case.kind == "cuda" else "cpu", precision="32-true")
        try:
            with case.limited(backend):
                size = Tuner(trainer).scale_batch_size(module, mode=mode)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            return {"batch_size": None, "status": _first_line(exc), "steps": counter[0]}
        finally:
            del trainer, module
    return {"batch_size": size, "status": "ok", "steps": counter[0]}


def ultralytics_style(case: GPUCase) -> dict[str, Any]:
    """Ultralytics' autobatch, re-implemented (not its code): one forward+backward, no optimizer, at 1, 2, 4, 8,
    16; a line fitted to the peak (reserved on CUDA); the size where it reaches 60 % of the limit."""
    backend = case.backend()
    model, sizes, peaks = case.model().to(backend.device), [1, 2, 4, 8, 16], []
    with case.limited(backend):
        for size in sizes:
            backend.clear_cache()
            with backend.measure() as window:
                out = model(torch.randn(size, *case.shape, device=backend.device))
                out.sum().backward()
                del out
            model.zero_grad(set_to_none=True)
            peaks.append(window.peak_bytes)
    del model
    slope, intercept = np.polyfit(sizes, peaks, 1)
    return {"batch_size": max(int((0.6 * case.limit - intercept) / slope), 1), "status": "ok", "steps": len(sizes)}


def _timed(fn, *args, **kwargs) -> dict[str, Any]:
    began = time.perf_counter()
    row = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    row["wall_s"] = round(time.perf_counter() - began, 2)
    return row


def _ours(case: GPUCase, find_max: bool) -> dict[str, Any]:
    row = ours(case, "memory", find_max)
    row["status"] = "ok"
    return row


FINDERS = [
    ("ours (default)", functools.partial(_ours, find_max=False)),
    ("ours (find_max)", functools.partial(_ours, find_max=True)),
    ("lightning power", functools.partial(lightning, mode="power")),
    ("lightning binsearch", functools.partial(lightning, mode="binsearch")),
    ("accelerate from 512", functools.partial(accelerate, style="cuda")),
    ("ultralytics-style (re-implemented)", ultralytics_style),
]


def _ratio(size: int | None, truth: int) -> float | None:
    return round(size / truth, 3) if size and truth else None


def run_finder_case(case: GPUCase, settings: Settings, record: dict[str, Any], save) -> None:
    """Fill ``record`` (already in the report) finder by finder, saving after each."""
    print(f"== finders: {case.model_name} @ {case.image_size}, limit {case.limit / GiB:g} GiB", flush=True)
    truth = _timed(truths, case)
    truth.update(_release())
    record["truth"] = truth
    print(f"   truth {truth}", flush=True)
    save()
    step_s = truth["step_s_at_budget_truth"]
    for name, finder in FINDERS:
        if settings.remaining() < 12:
            record["skipped_finders"].append({"finder": name, "reason": f"{settings.remaining():.0f} s of budget left"})
            continue
        try:
            row = _timed(finder, case)
        except Exception as exc:  # a finder's own failure is a result, not the end of the suite
            row = {"batch_size": None, "status": f"error: {type(exc).__name__}: {_first_line(exc)[8:]}", "steps": None}
            row["wall_s"] = None
        row.update(_release())
        size = row["batch_size"]
        row["ratio_to_max_truth"] = _ratio(size, truth["max_truth"])
        row["ratio_to_budget_truth"] = _ratio(size, truth["budget_truth"])
        row["step_equivalents"] = round(row["wall_s"] / step_s, 1) if row["wall_s"] is not None and step_s else None
        record["finders"][name] = row
        save()
    checked: dict[int, str] = {}
    for name, row in record["finders"].items():
        size = row["batch_size"]
        if size is not None and size not in checked:
            if settings.remaining() < 8:
                checked[size] = "skipped (budget)"
            else:
                try:
                    checked[size] = follow_up(case, size)
                except Exception as exc:
                    checked[size] = f"error: {_first_line(exc)[8:]}"
                _release()
        row["follow_up"] = checked[size] if size is not None else "-"
        print(f"   {name}: {row}", flush=True)
    save()


# --- the trainer case ------------------------------------------------------------------------------------------
def _clock_display():
    from mps_autobatch.train.commands import Display

    class Clock(Display):
        """Quiet; records when each update ended (the trainer calls step() after its loss.item() sync)."""

        def __init__(self) -> None:
            super().__init__(quiet=True)
            self.ends: list[float] = []
            self.speeds: list[float] = []

        def step(self, loss: float, images_per_s: float, memory: int | None) -> None:
            self.ends.append(time.perf_counter())
            self.speeds.append(images_per_s)

    return Clock()


def compute_only(
    model_name: str, image_size: int, batch: int, device: torch.device, steps: int, warm: int, sync_each: bool
) -> float:
    """Images/s of forward, loss, backward, optimizer step, zero_grad on one batch already on the device, with the
    trainer's model, optimizer, loss, precision and memory format; no data loading."""
    from mps_autobatch.devices import get_backend
    from mps_autobatch.train._setup import create_model, make_optimizer

    backend = get_backend(str(device))
    amp = backend.choose_amp("auto")
    channels_last = backend.prefers_channels_last
    torch.manual_seed(0)
    model = create_model(model_name, 10, pretrained=False, weights=None).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    model.train()
    optimizer = make_optimizer("adamw", model, lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(10, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")

    def one() -> None:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = loss_fn(model(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sync_each:
            loss.item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warm):
        one()
    sync()
    began = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    seconds = time.perf_counter() - began
    return batch * steps / seconds


def loader_only(settings: Settings, batch: int, pin_memory: bool) -> float:
    """Images/s of the trainer's own training loader alone (same dataset, transform, workers), nothing on the GPU."""
    from mps_autobatch.train._setup import model_data_config
    from mps_autobatch.train.config import TrainConfig
    from mps_autobatch.train.data import load_splits, train_loader

    config = TrainConfig(
        dataset="synthetic", model=settings.trainer_model, image_size=settings.trainer_size, workers=settings.workers
    )
    splits = load_splits(config, model_data_config(config.model))
    loader, _ = train_loader(splits.train, batch, seed=0, workers=settings.workers, pin_memory=pin_memory, spawn=False)
    warm, timed = (1, 2) if settings.smoke else (2 * settings.workers, 40)
    batches = iter(loader)
    for _ in range(warm):
        next(batches)
    began = time.perf_counter()
    for _ in range(timed):
        next(batches)
    seconds = time.perf_counter() - began
    del batches, loader
    return batch * timed / seconds


@contextlib.contextmanager
def _big_synthetic(train_size: int):
    """The trainer's synthetic dataset has 512 training images (not configurable): at a batch of ~200 an epoch is
    2 updates, and each epoch end evaluates and writes two checkpoints. Enlarge the (lazily generated) training
    split so the measured updates are all inside one epoch."""
    from mps_autobatch.train import data

    original = data.load_dataset
    data.load_dataset = functools.partial(original, synthetic_sizes=(train_size, 128))
    try:
        yield
    finally:
        data.load_dataset = original


def run_trainer_case(settings: Settings, record: dict[str, Any], save) -> None:
    try:
        import albumentations  # noqa: F401  (mps_autobatch.train.data needs it, synthetic data included)
    except Exception as exc:  # missing, or a dependency that does not import (pydantic, cv2, ...)
        reason = f"{type(exc).__name__}: {_first_line(exc)[8:]}"
        record["status"] = f"skipped: albumentations does not import ({reason}); benchmarks/gpu_suite.sh installs it"
        save()
        return
    from mps_autobatch.train.config import TrainConfig
    from mps_autobatch.train.engine import train

    print(f"== trainer: {settings.trainer_model} @ {settings.trainer_size}, workers {settings.workers}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)  # the probe applies the limit itself; training is uncapped
    warm, measured = settings.warm_updates, settings.measured_updates
    display = _clock_display()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder, _big_synthetic(SYNTHETIC_TRAIN):
        config = TrainConfig(
            dataset="synthetic",
            model=settings.trainer_model,
            image_size=settings.trainer_size,
            epochs=1,
            batch_size="auto",
            memory_limit=settings.trainer_limit,
            device="cuda" if settings.kind == "cuda" else "cpu",
            workers=settings.workers,
            stop_after=warm + measured,
            output=folder,
            probe_cache=False,
        )
        result = train(config, display=display)
    # The trainer probes its own step (its model, loss, optimizer, scaler, channels_last) before training.
    assert result.probe is not None
    probe = {
        "batch_size": result.probe.batch_size,
        "max_batch_size": result.probe.max_batch_size,
        "seconds": result.probe.elapsed_s,
    }
    train_wall = time.perf_counter() - began
    _release()
    batch = result.micro_batch_size
    ends = display.ends
    if len(ends) < warm + measured:
        raise RuntimeError(f"the trainer stopped after {len(ends)} updates, not {warm + measured}")
    window = ends[warm + measured - 1] - ends[warm - 1]
    trainer_ips = batch * measured / window
    own = batch * measured / sum(batch / speed for speed in display.speeds[warm : warm + measured])
    record.update(
        model=settings.trainer_model,
        image_size=settings.trainer_size,
        limit=settings.trainer_limit,
        probe=probe,
        batch_size=batch,
        accumulation_steps=-(-result.effective_batch_size // batch),
        ooms_during_training=sum(1 for event in result.events if event.get("event") == "oom"),
        workers=settings.workers,
        warm_up_updates=warm,
        measured_updates=measured,
        trainer_images_per_s=round(trainer_ips, 1),
        trainer_own_metric_images_per_s=round(own, 1),
        train_call_wall_s=round(train_wall, 1),
        note=(
            f"Trainer images/s = batch x {measured} updates / wall time between the ends of update {warm} and "
            f"{warm + measured} (the trainer calls its display after each update's loss.item(), so the GPU work is "
            "done); the synthetic training split is enlarged from its fixed 512 images so that no epoch end "
            "(evaluation, checkpoints) falls in the window. The trainer's own figure divides by per-update times "
            "taken before that loss.item() sync."
        ),
    )
    save()
    device = torch.device("cuda" if settings.kind == "cuda" else "cpu")
    compute_ips = compute_only(settings.trainer_model, settings.trainer_size, batch, device, measured, warm, False)
    _release()
    record["compute_only_images_per_s"] = round(compute_ips, 1)
    record["ratio"] = round(trainer_ips / compute_ips, 3)
    record["status"] = "ok"
    save()
    print(
        f"   trainer {trainer_ips:.0f} img/s, compute-only {compute_ips:.0f} img/s, ratio {record['ratio']}", flush=True
    )
    # Diagnostics, only when the budget allows: what the trainer's per-update loss.item() sync costs the compute
    # loop, and how fast the trainer's loader alone delivers batches.
    if settings.smoke or settings.remaining() > 40:
        steps = measured // 2 or 1
        record["compute_only_with_item_sync_images_per_s"] = round(
            compute_only(settings.trainer_model, settings.trainer_size, batch, device, steps, warm // 2 or 1, True), 1
        )
        _release()
        save()
    if settings.smoke or settings.remaining() > 25:
        with _big_synthetic(SYNTHETIC_TRAIN):
            record["loader_only_images_per_s"] = round(loader_only(settings, batch, device.type == "cuda"), 1)
        save()
    print(f"   trainer case: {json.dumps(record)}", flush=True)


# --- output ----------------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Batch-size finders and trainer throughput on {report['device']} ({report['date']})",
        "",
        f"torch {report['torch']}, Python {report['python']}, {report['cpu_count']} CPU cores. "
        f"Command: `{report['command']}`. Budget {report['budget_s']:g} s; this run took "
        f"{report.get('total_wall_s')} s.",
        "",
        report["precision_note"],
        "",
        "Finders: each under a real limit (`torch.cuda.set_per_process_memory_fraction(limit / total)`); budget = "
        "0.8 x limit. Max truth: largest size whose training step runs (doubling, then bisection). Budget truth: "
        "largest size whose measured peak (`max_memory_reserved` after `empty_cache` + `reset_peak_memory_stats`) "
        "<= budget. Step-equivalents = the finder's wall time / one step at the budget truth. Steps: real training "
        "(and, for Lightning, validation) steps; ours' uncounted warm-up step excluded. Follow-up: 20 training steps, "
        "a short last batch (a third) and 3 eval batches at the chosen size, under the same limit.",
        "",
    ]
    for case in report["finder_cases"]:
        lines.append(f"## {case['model']} @ {case['image_size']} px, limit {case['limit_gib']:g} GiB")
        lines.append("")
        if "error" in case:
            lines += [f"Failed: {case['error']}", ""]
        t = case.get("truth")
        if t:
            lines += [
                f"Max truth {t['max_truth']}, budget truth {t['budget_truth']} (peak {t['peak_mib_at_budget_truth']} "
                f"MiB), one step at the budget truth {t['step_s_at_budget_truth']} s (truth search: "
                f"{t['truth_steps']} steps, {t['wall_s']} s).",
                "",
            ]
        if case["finders"] or case["skipped_finders"]:
            lines += finder_table(case["finders"])
        for skipped in case["skipped_finders"]:
            lines.append(f"| {skipped['finder']} | skipped: {skipped['reason']} |" + "|" * 8)
        lines.append("")
    trainer = report.get("trainer")
    if trainer:
        lines += ["## Trainer throughput", ""]
        if trainer.get("status") != "ok":
            lines += [f"{trainer.get('status')}", ""]
        if "trainer_images_per_s" in trainer:
            probe = trainer["probe"]
            lines += [
                f"`train()` on dataset synthetic, {trainer['model']} @ {trainer['image_size']} px, batch "
                f"{trainer['batch_size']} (its probe, ours, under {trainer['limit']}: max verified "
                f"{probe.get('max_batch_size')}, {probe.get('seconds', 0):.1f} s; amp {probe.get('amp')}, "
                f"channels_last {probe.get('channels_last')}), {trainer['workers']} loader workers, "
                f"{trainer['measured_updates']} updates timed after {trainer['warm_up_updates']} warm-up updates.",
                "",
                "| measure | images/s |",
                "|---|---:|",
                f"| trainer, wall clock between update ends | {trainer['trainer_images_per_s']} |",
                "| trainer's own per-update figure (its epoch formula) | "
                f"{trainer['trainer_own_metric_images_per_s']} |",
                f"| compute-only loop (inputs on the GPU, no sync per step) | "
                f"{_cell(trainer.get('compute_only_images_per_s'))} |",
                f"| compute-only loop + loss.item() every step | "
                f"{_cell(trainer.get('compute_only_with_item_sync_images_per_s'))} |",
                f"| trainer's loader alone | {_cell(trainer.get('loader_only_images_per_s'))} |",
                "",
                f"**Ratio trainer / compute-only: {_cell(trainer.get('ratio'))}** (goal >= 0.9). OOMs during "
                f"training: {trainer['ooms_during_training']}.",
                "",
            ]
        if trainer.get("note"):
            lines += [trainer["note"], ""]
    if report["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['case']}: {s['reason']}" for s in report["skipped"]] + [""]
    return "\n".join(lines)


def _writer(report: dict[str, Any], out: Path, settings: Settings):
    def save() -> None:
        report["total_wall_s"] = round(settings.elapsed(), 1)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_suite.json", json.dumps(report, indent=2)), ("gpu_suite.md", markdown(report))):
            partial = out / f".{name}.tmp"
            partial.write_text(text)
            partial.replace(out / name)

    return save


def _header(settings: Settings, argv: list[str]) -> dict[str, Any]:
    cuda = settings.kind == "cuda"
    device = (
        torch.cuda.get_device_name() if cuda else f"CPU smoke run ({platform.machine()}, simulated CUDA-text device)"
    )
    total = torch.cuda.get_device_properties(0).total_memory if cuda else SIM_TOTAL
    return {
        "device": device,
        "device_total_gib": round(total / GiB, 2),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": os.environ.get("GPU_SUITE_COMMAND") or " ".join(["python -m benchmarks.gpu_suite", *argv]),
        "smoke": settings.smoke,
        "limit_gib": round(settings.limit_bytes / GiB, 4),
        "budget_s": settings.budget_s,
        "precision_note": (
            "Finders in fp32 (ours' default amp=None, Lightning precision='32-true', Accelerate and the truths on "
            "the same fp32 workload), PyTorch's default TF32 flags: "
            f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, matmul.allow_tf32="
            f"{torch.backends.cuda.matmul.allow_tf32}; AdamW everywhere. The trainer case uses the trainer's CUDA "
            "defaults (bf16 autocast, channels_last), and so does its compute-only loop."
        ),
        "finder_cases": [],
        "trainer": None,
        "skipped": [],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="no new case after this")
    parser.add_argument("--limit-gib", type=float, default=LIMIT_GIB, help="the memory limit of every case")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the same code, to a temp folder")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over a network that is not there
    settings = Settings(args.cpu_smoke, args.limit_gib, args.budget_s if not args.cpu_smoke else 60.0)
    if not settings.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here. Run on a GPU machine, or pass --cpu-smoke.")
    out = args.out if args.out is not None else (None if settings.smoke else RESULTS)
    if settings.smoke:
        out = Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_")) if out is None else out
        if out.resolve() == RESULTS.resolve():
            parser.error("--cpu-smoke never writes benchmarks/results/; pass another --out or none.")
    report = _header(settings, argv)
    save = _writer(report, out, settings)
    print(f"device {report['device']}, torch {report['torch']}, writing {out}", flush=True)

    schedule: list[tuple[str, Any]] = [("finders", case) for case in settings.finder_cases]
    schedule.insert(1, ("trainer", None))
    for kind, spec in schedule:
        name = "trainer" if kind == "trainer" else f"finders {spec[0]} @ {spec[1]}"
        estimate = ESTIMATE_S["trainer" if kind == "trainer" else f"finders@{384 if spec[1] > 224 else 224}"]
        estimate = 5.0 if settings.smoke else estimate
        if settings.remaining() < estimate:
            left = settings.remaining()
            reason = f"{left:.0f} s of the {settings.budget_s:g} s budget left, the case needs ~{estimate:g} s"
            report["skipped"].append({"case": name, "reason": reason})
            print(f"== skipped {name}: {reason}", flush=True)
            save()
            continue
        began = time.perf_counter()
        if kind == "trainer":
            record: dict[str, Any] = {"status": "running"}
            report["trainer"] = record
            try:
                run_trainer_case(settings, record, save)
            except Exception as exc:
                record["status"] = f"error: {type(exc).__name__}: {_first_line(exc)[8:]}"
                print(f"   trainer case failed: {record['status']}", flush=True)
        else:
            case = GPUCase(spec[0], spec[1], settings.limit_bytes, settings.kind)
            record = {"model": spec[0], "image_size": spec[1], "limit_gib": round(case.limit / GiB, 4)}
            record.update(budget_gib=round(case.budget / GiB, 4), truth=None, finders={}, skipped_finders=[])
            report["finder_cases"].append(record)
            try:
                run_finder_case(case, settings, record, save)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {_first_line(exc)[8:]}"
                print(f"   case failed: {record['error']}", flush=True)
        record["case_wall_s"] = round(time.perf_counter() - began, 1)
        _release()
        save()
    save()
    print(f"done in {settings.elapsed():.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    main()
