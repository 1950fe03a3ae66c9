"""`ProbeSpec`: everything that changes a probe's memory use or its answer, checked once, hashed for the cache.

The CLI, the trainer, the child-process probe and the cache key are all built from one `ProbeSpec`; no
settings travel as a dict. Checks raise one-line `ValueError`/`TypeError` naming the Python argument.

Example:
    >>> spec = ProbeSpec(model="resnet18", input_shape=(3, 224, 224), requested=32)
    >>> spec.headroom, spec.optimizer
    (0.2, 'adamw')
    >>> ProbeSpec(requested=0)
    Traceback (most recent call last):
    ...
    ValueError: requested must be >= 1, got 0. Pass the batch size you want, or leave it out to search from small.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

__all__ = ["OPTIMIZER_NAMES", "ProbeSpec"]

OPTIMIZER_NAMES = ("adamw", "adam", "sgd")
"""The optimizers a probe can build by name (`mps_autobatch.workload.OPTIMIZERS`)."""

_AMP = ("bf16", "fp16")
_OBJECTIVES = ("memory", "throughput")
_MODES = ("train", "eval")


def _check_positive(name: str, value: object, fix: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}. {fix}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}. {fix}")


def _check_input_shape(shape: object) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, int) or not isinstance(shape, (tuple, list)):
        raise TypeError(
            f"input_shape must be one sample's shape as a tuple, got {shape!r}. Pass e.g. input_shape=(3, 224, 224)"
            + (f" or input_shape=({shape},) for a vector." if isinstance(shape, int) else ".")
        )
    if not shape or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in shape):
        raise ValueError(
            f"input_shape must be the positive sizes of one sample, got {tuple(shape)!r}. "
            "Pass e.g. input_shape=(3, 224, 224)."
        )
    return tuple(shape)


@dataclass(frozen=True, kw_only=True)
class ProbeSpec:
    """The settings of one probe: what is probed, how each step runs, and how the search decides.

    Attributes:
        model: what is probed, by name: a timm model name, a module's architecture fingerprint, or a step
            function's ``cache_key``; None when unnamed (nothing is cached then).
        input_shape: one sample's shape, e.g. ``(3, 224, 224)``, for a module or a timm name.
        example: instead of ``input_shape``, the structure, dtypes and shapes of the one sample batched
            (`mps_autobatch.inputs.describe`), e.g. ``"{input_ids: int64[512], labels: int64[]}"``.
        mode: "train" (a training step) or "eval" (the forward alone, under inference mode).
        num_classes: classes of the synthetic targets (default: the model's own).
        optimizer: "adamw", "adam" or "sgd", or ``"custom:<class>"`` for an optimizer object or factory.
        amp: None, "bf16" or "fp16" autocast.
        channels_last: the channels-last memory format for the model and the batch.
        memory_limit: bytes; None for what the device allows.
        headroom: the fraction of the limit kept free (the 20%-reduction rule by default).
        requested: the batch size wanted; the search starts at 80% of it.
        start: the first size probed instead (default: 80% of ``requested``, else 2).
        max_batch_size: never probe above this.
        multiple_of: only probe and recommend multiples of this.
        steps_per_trial: training steps per trial.
        find_max: also find the largest size that runs at all.
        objective: "memory" (the largest size that fits) or "throughput" (the knee of samples/s).
    """

    model: str | None = None
    input_shape: tuple[int, ...] | None = None
    example: str | None = None
    mode: Literal["train", "eval"] = "train"
    num_classes: int | None = None
    optimizer: str = "adamw"
    amp: Literal["bf16", "fp16"] | None = None
    channels_last: bool = False
    memory_limit: int | None = None
    headroom: float = 0.2
    requested: int | None = None
    start: int | None = None
    max_batch_size: int | None = None
    multiple_of: int = 1
    steps_per_trial: int = 1
    find_max: bool = False
    objective: Literal["memory", "throughput"] = "memory"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", _check_input_shape(self.input_shape))
        _check_positive(
            "requested", self.requested, "Pass the batch size you want, or leave it out to search from small."
        )
        _check_positive("start", self.start, "Pass the first batch size to probe, or leave it out.")
        _check_positive(
            "max_batch_size", self.max_batch_size, "Pass the largest size worth probing, e.g. the dataset length."
        )
        _check_positive("multiple_of", self.multiple_of, "Pass 1 for any size, or e.g. 8 for multiples of 8.")
        _check_positive("steps_per_trial", self.steps_per_trial, "Pass 1 or more.")
        _check_positive("num_classes", self.num_classes, "Pass the classifier's output size.")
        _check_positive("memory_limit", self.memory_limit, "Pass bytes, or a size such as '8GiB'.")
        headroom = self.headroom
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
            raise ValueError(
                f"headroom must be a fraction in [0, 1), got {headroom!r}. The default 0.2 keeps 20% free."
            )
        if self.max_batch_size is not None and self.max_batch_size < self.multiple_of:
            raise ValueError(
                f"max_batch_size {self.max_batch_size} is below multiple_of {self.multiple_of}: no size is allowed. "
                "Raise max_batch_size or lower multiple_of."
            )
        if self.input_shape is not None and self.example is not None:
            raise ValueError("Pass input_shape or example, not both: example= already gives one sample's shape.")
        if self.mode not in _MODES:
            raise ValueError(
                f"Unknown mode {self.mode!r}. Use 'train' (a training step) or 'eval' (the forward alone)."
            )
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}. Use 'memory' or 'throughput'.")
        if self.amp is not None and self.amp not in _AMP:
            raise ValueError(f"Unknown amp {self.amp!r}. Use None, 'bf16' or 'fp16'.")
        if self.optimizer not in OPTIMIZER_NAMES and not str(self.optimizer).startswith("custom:"):
            raise ValueError(
                f"Unknown optimizer {self.optimizer!r}. Use one of: {', '.join(OPTIMIZER_NAMES)}, or pass an optimizer."
            )

    def cache_key(self, device_identity: str) -> dict[str, Any]:
        """The cache key: every setting but the limit, the device and the versions that change the answer.

        The limit is not in it: an answer found under a limit no larger than today's still fits, so a
        default limit that drifts with free memory keeps hitting (`mps_autobatch.cache.load` checks it).

        Example:
            >>> key = ProbeSpec(model="resnet18", memory_limit=2**30).cache_key("cpu:x86_64:1")
            >>> key["model"], "memory_limit" in key, sorted(key["versions"])
            ('resnet18', False, ['mps_autobatch', 'timm', 'torch'])
        """
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k != "memory_limit"}
        settings["input_shape"] = list(self.input_shape) if self.input_shape is not None else None
        return {**settings, "device": device_identity, "versions": _versions()}


def _versions() -> dict[str, str | None]:
    # From the installed metadata: a cache hit must not pay for importing timm.
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"torch": version("torch"), "timm": version("timm"), "mps_autobatch": version("mps-autobatch")}
