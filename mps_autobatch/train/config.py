"""`TrainConfig`: every setting of a training run, checked once, stored in each checkpoint."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["RESUME_FIELDS", "TrainConfig"]

AmpSetting = Literal["auto", "off", "bf16", "fp16"]

# The fields that decide the numbers a run computes: a resumed run must agree on all of them, or it would
# not continue the same run. Everything else (epochs, device, workers, output, ...) may change on resume.
RESUME_FIELDS: tuple[str, ...] = (
    "dataset",
    "model",
    "image_size",
    "pretrained",
    "weights",
    "batch_size",
    "effective_batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "amp",
    "seed",
    "val_fraction",
    "dev_samples",
    "sync_bn",
)

_DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """What to train, on what, and how; `autobatch train`'s options one to one.

    Attributes:
        dataset: "food-101", "imagefolder:PATH" or "synthetic".
        data_dir: where the dataset lives (food-101) or is downloaded to.
        model: a timm model name.
        image_size: training and evaluation height and width in pixels.
        pretrained: start from the model's pretrained weights; None means on for real datasets, off for
            "synthetic".
        weights: a local weights file for the model (implies pretrained).
        epochs: passes over the training split.
        batch_size: the micro-batch (samples per forward/backward), or "auto" to probe for it.
        effective_batch_size: samples per optimizer update, reached by gradient accumulation; None means
            the micro-batch size.
        eval_batch_size: images per evaluation batch, or "auto" to probe the evaluation's own forward at the
            first evaluation (where the optimizer state is in memory); None means "auto" with
            ``batch_size="auto"``, else the micro-batch. An out-of-memory error while evaluating halves it
            alone: the micro-batch and the effective batch never change because of evaluation.
        optimizer: "adamw" or "sgd" (momentum 0.9, Nesterov).
        lr: peak learning rate; None means 1e-3 for AdamW, 0.05 for SGD.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        warmup_epochs: linear warmup before the cosine decay, in epochs (fractions allowed).
        label_smoothing: cross-entropy label smoothing.
        amp: "auto" (bf16/fp16 on CUDA, bf16 on MPS where torch and macOS allow it, off on CPU), "off",
            "bf16" or "fp16".
        device: "auto", "mps", "cuda", "cuda:N" or "cpu".
        simulate: train on a simulated Mac, e.g. "mps:16GiB" (compute on the CPU, memory simulated).
        memory_limit: hold training (and the probe) to this much device memory, e.g. "8GiB".
        empty_cache_every: release the allocator's cache every K updates; None means 10 on MPS, 0 (never)
            elsewhere.
        seed: seeds weights, data order and augmentation.
        workers: data-loading processes (0 loads in this process).
        dev_samples: train on a stratified subset of this many images (the seed's --dev-mode).
        val_fraction: the share of the training split held out for validation.
        download: download the dataset when it is missing (food-101).
        output: the run folder (metrics, last.pt, best.pt); None means runs/<dataset>-<model>.
        resume: continue the run in ``output`` from its last.pt.
        checkpoint_every: also write last.pt every K updates within an epoch (0: at epoch ends only).
        stop_after: stop after this many updates in this invocation, writing last.pt (continue with resume).
        probe_cache: reuse a cached probe answer for batch_size="auto".
        sync_bn: under torchrun on CUDA, BatchNorm statistics over the global batch (SyncBatchNorm).
    """

    dataset: str = "food-101"
    data_dir: str = "data"
    model: str = "efficientnet_b0"
    image_size: int = 224
    pretrained: bool | None = None
    weights: str | None = None
    epochs: int = 50
    batch_size: int | Literal["auto"] = "auto"
    effective_batch_size: int | None = None
    eval_batch_size: int | Literal["auto"] | None = None
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    amp: AmpSetting = "auto"
    device: str = "auto"
    simulate: str | None = None
    memory_limit: str | None = None
    empty_cache_every: int | None = None
    seed: int = 0
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    dev_samples: int | None = None
    val_fraction: float = 0.1
    download: bool = False
    output: str | None = None
    resume: bool = False
    checkpoint_every: int = 0
    stop_after: int | None = None
    probe_cache: bool = True
    sync_bn: bool = False

    def __post_init__(self) -> None:
        _check_sizes(self)
        _check_choices(self)

    @property
    def use_pretrained(self) -> bool:
        """Whether the model starts from pretrained weights (see ``pretrained``)."""
        if self.weights is not None:
            return True
        return self.pretrained if self.pretrained is not None else self.dataset != "synthetic"

    @property
    def eval_sizing(self) -> int | Literal["auto", "micro"]:
        """How evaluation batches are sized: a fixed size, "auto" (probed) or "micro" (the current micro-batch).

        Example:
            >>> TrainConfig().eval_sizing, TrainConfig(batch_size=32).eval_sizing
            ('auto', 'micro')
        """
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        return "auto" if self.batch_size == "auto" else "micro"

    @property
    def peak_lr(self) -> float:
        """The learning rate after warmup."""
        return self.lr if self.lr is not None else _DEFAULT_LR[self.optimizer]

    @property
    def output_dir(self) -> Path:
        """The run folder: ``output``, or runs/<dataset>-<model>.

        Example:
            >>> TrainConfig(dataset="imagefolder:/data/digits", model="resnet18").output_dir.as_posix()
            'runs/digits-resnet18'
        """
        if self.output is not None:
            return Path(self.output)
        name = Path(self.dataset.split(":", 1)[1]).name if self.dataset.startswith("imagefolder:") else self.dataset
        return Path("runs") / re.sub(r"[^\w.-]+", "_", f"{name}-{self.model}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint or JSON."""
        return dataclasses.asdict(self)

    def resume_mismatch(self, saved: dict[str, Any]) -> str | None:
        """The first setting that differs from a checkpoint's config, as a sentence; None when they agree.

        Example:
            >>> TrainConfig(seed=1).resume_mismatch(TrainConfig(seed=0).to_dict())
            'seed=1, but the checkpoint was trained with seed=0'
        """
        for name in RESUME_FIELDS:
            if name in saved and saved[name] != getattr(self, name):
                return f"{name}={getattr(self, name)!r}, but the checkpoint was trained with {name}={saved[name]!r}"
        return None


def _positive(name: str, value: Any, fix: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}. {fix}")


def _check_sizes(config: TrainConfig) -> None:
    if config.batch_size != "auto":
        _positive("--batch-size", config.batch_size, "Pass a positive --batch-size, or auto to probe for one.")
    if config.eval_batch_size not in (None, "auto"):
        _positive("--eval-batch-size", config.eval_batch_size, "Pass a positive --eval-batch-size, or auto.")
    if config.effective_batch_size is not None:
        _positive("--effective-batch-size", config.effective_batch_size, "Pass the optimisation batch, e.g. 64.")
    _positive("--epochs", config.epochs, "Pass e.g. --epochs 50.")
    _positive("--workers", config.workers, "Pass 0 to load data in this process.", allow_zero=True)
    _positive("--checkpoint-every", config.checkpoint_every, "Pass 0 for epoch ends only.", allow_zero=True)
    if config.image_size < 8:
        raise ValueError(f"--image-size must be >= 8 pixels, got {config.image_size}. Pass e.g. --image-size 224.")
    if config.empty_cache_every is not None:
        _positive("--empty-cache-every", config.empty_cache_every, "Pass 0 to never empty it.", allow_zero=True)
    if config.dev_samples is not None:
        _positive("--dev-samples", config.dev_samples, "Pass e.g. --dev-samples 500.")
    if config.stop_after is not None:
        _positive("--stop-after", config.stop_after, "Pass a number of optimizer updates.")


def _check_choices(config: TrainConfig) -> None:
    if config.optimizer not in _DEFAULT_LR:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}. Use adamw or sgd.")
    if config.amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"Unknown --amp {config.amp!r}. Use auto, off, bf16 or fp16.")
    if config.lr is not None and not config.lr > 0:
        raise ValueError(f"--lr must be positive, got {config.lr}. Pass e.g. --lr 1e-3.")
    if config.weight_decay < 0 or config.warmup_epochs < 0:
        raise ValueError("--weight-decay and --warmup-epochs must be >= 0. Pass e.g. --weight-decay 0.05.")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}.")
    if not 0 < config.val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}. Pass e.g. 0.1.")
    if config.simulate is not None and config.device != "auto":
        raise ValueError(f"--simulate replaces the device; drop --device {config.device!r} or --simulate.")
    if config.weights is not None and not Path(config.weights).is_file():
        raise ValueError(f"Weights file {config.weights!r} not found. Pass --weights with an existing file.")
    if config.weights is not None and config.pretrained is False:
        raise ValueError("--weights loads pretrained weights, which --no-pretrained turns off. Pass only one.")
