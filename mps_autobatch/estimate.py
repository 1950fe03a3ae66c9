"""Predict a training step's peak tensor memory without a device: trace it on fake tensors.

Under `torch._subclasses.fake_tensor.FakeTensorMode` every tensor is metadata only, so a whole training
step (forward, cross-entropy, backward, optimizer step) runs in seconds with no memory behind it, and
`torch.distributed._tools.mem_tracker.MemTracker` books each storage as the real step would allocate it.
The result is the peak of live tensor bytes: parameters, buffers, gradients, optimizer state, activations
and backward temporaries. Given a device's allocator rules (`mps_autobatch.allocator`), the same trace also
replays every buffer through a caching allocator: rounding and cache included, what its heaps hold at the
peak. Neither includes CUDA context or MPSGraph memory: `calibrate` measures what the device adds on two real
steps before the estimate is trusted near a limit.

Tracing is on fake *cpu* tensors: a fake "mps" or "cuda" module cannot be built where that backend is
missing, and tensor sizes do not depend on the device.
"""

from __future__ import annotations

import contextlib
import copy
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from ._tracking import StorageBook
from .allocator import AllocatorModel, CachingAllocator
from .devices import CPUBackend, MemoryBackend
from .errors import AutobatchError
from .step import AMP_DTYPES, TrainingStep
from .workload import OPTIMIZERS, make_workload

__all__ = [
    "Calibration",
    "Estimate",
    "calibrate",
    "estimate_grid",
    "estimate_peak",
    "measure_device_peaks",
    "measure_peak",
]

_CPU = torch.device("cpu")
WARM_UP_SAMPLES = 2
"""The size of the uncounted first step that creates the optimizer state, in the dry run and in `calibrate`."""


@dataclass(frozen=True)
class Estimate:
    """The predicted tensor peak of one steady-state training step.

    Attributes:
        batch_size: samples per step.
        input_shape: the shape of one sample, e.g. ``(3, 224, 224)``.
        peak_bytes: the predicted peak of live tensor bytes during the step (parameters, buffers,
            gradients, optimizer state, activations and temporaries), with the optimizer state already
            created by an earlier step.
        allocator_bytes: with allocator rules, the peak of what a caching allocator with those rules holds
            for the same step from an empty cache (its buffers rounded up, and the freed ones it keeps);
            None without rules.
    """

    batch_size: int
    input_shape: tuple[int, ...]
    peak_bytes: int
    allocator_bytes: int | None = None

    @property
    def modelled_bytes(self) -> int:
        """What the device's allocator would hold, where rules were given; the tensor peak where not."""
        return self.peak_bytes if self.allocator_bytes is None else self.allocator_bytes


def _check_args(
    input_shapes: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    num_classes: int,
    optimizer: str,
    amp: str | None,
) -> None:
    for batch_size in batch_sizes:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}. Pass a positive batch_size.")
    for shape in input_shapes:
        if len(shape) == 0 or any(not isinstance(size, int) or size < 1 for size in shape):
            raise ValueError(
                f"input_shape must be the positive sizes of one sample, got {tuple(shape)!r}. "
                "Pass e.g. input_shape=(3, 224, 224)."
            )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}. Pass the classifier's output size.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Use one of: {', '.join(OPTIMIZERS)}.")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"Unknown amp {amp!r}. Use None, {' or '.join(map(repr, AMP_DTYPES))}.")


def _fake_copy(model: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake cpu tensors; ``model`` is not touched.

    Values do not matter for memory, so each tensor becomes an empty fake one of the same size, stride
    and dtype, handed to `copy.deepcopy` through its memo so the real storages are never copied.
    Shared (tied) tensors stay shared, as the memo is keyed by identity.
    """

    def fake_like(tensor: torch.Tensor) -> torch.Tensor:
        with mode:
            return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=_CPU)

    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(fake_like(param), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = fake_like(buffer)
    return copy.deepcopy(model, memo)


def _fake_model(model: nn.Module | Callable[[], nn.Module], mode: FakeTensorMode) -> nn.Module:
    if isinstance(model, nn.Module):
        return _fake_copy(model, mode)
    try:
        with mode:
            built = model()
    except DataDependentOutputException:
        # The constructor reads a tensor's value (timm's drop-path schedules call .item()), which fake
        # tensors cannot answer: build it for real, parameters only, and copy it onto fake tensors.
        built = model()
    if not isinstance(built, nn.Module):
        raise TypeError(f"model factory must return an nn.Module, got {type(built).__name__}.")
    tensors = [*built.parameters(), *built.buffers()]
    # A factory that hands back a model it built earlier (a cache, a global) still holds real tensors.
    return built if all(isinstance(t, FakeTensor) for t in tensors) else _fake_copy(built, mode)


def _fake_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input_shape: tuple[int, ...],
    batch_size: int,
    num_classes: int,
    amp: str | None,
    channels_last: bool = False,
) -> None:
    """The `TrainingStep` `ModuleWorkload.step` runs, on fake tensors (no GradScaler: its few scalars are noise)."""
    inputs = torch.randn(batch_size, *input_shape, device=_CPU)
    targets = torch.randint(num_classes, (batch_size,), device=_CPU)
    step = TrainingStep(
        model, optimizer, nn.functional.cross_entropy, amp=amp, device=_CPU, channels_last=channels_last
    )
    step(inputs, targets)


def _trace(
    model: nn.Module | Callable[[], nn.Module],
    *,
    input_shapes: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    num_classes: int,
    optimizer: str,
    amp: str | None,
    channels_last: bool = False,
    allocator: AllocatorModel | None = None,
) -> list[Estimate]:
    _check_args(input_shapes, batch_sizes, num_classes, optimizer, amp)
    shapes = [tuple(shape) for shape in input_shapes]
    points = [(shape, batch_size) for shape in shapes for batch_size in batch_sizes]
    if not points:
        return []
    mode = FakeTensorMode()
    # Fake ops draw no random numbers, but a factory may seed or draw outside them: keep the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        fake = _fake_model(model, mode)
        fake.train()
        if channels_last:
            # Module.to swaps parameters, which fake ones refuse: convert the 4-D weights in place instead.
            with mode:
                for param in fake.parameters():
                    if param.dim() == 4:
                        param.data = param.data.contiguous(memory_format=torch.channels_last)
        # Every buffer of the step lives on the device (parameters, state, the batch, activations): the replay
        # books each storage the step touches or makes, from the first step on, so the state is booked too.
        books = CachingAllocator(allocator) if allocator is not None else None
        replay = StorageBook(books.allocate, books.release, adopt_inputs="all") if books is not None else None
        with mode, replay or contextlib.nullcontext():
            opt = OPTIMIZERS[optimizer](fake.parameters())
            # An untracked first step creates the optimizer state, so every traced step is a steady one. It runs
            # at WARM_UP_SAMPLES whatever the sizes traced, as a probe's and calibrate's warm-ups do: the buffers
            # the state is given depend on what the first step's activations left in the allocator's cache.
            _fake_step(fake, opt, points[0][0], WARM_UP_SAMPLES, num_classes, amp, channels_last)
            estimates = []
            for shape, batch_size in points:
                if books is not None:
                    books.empty_cache()  # each step from an empty cache, as a probe's trial runs
                    books.reset_peak()
                # A fresh tracker per step: its peak starts from what is live now (params, buffers, state).
                tracker = MemTracker()
                tracker.track_external(fake, opt)
                with tracker:
                    _fake_step(fake, opt, shape, batch_size, num_classes, amp, channels_last)
                peak = tracker.get_tracker_snapshot("peak").get(_CPU, {}).get("Total", 0)
                held = books.peak_heap_bytes if books is not None else None
                estimates.append(Estimate(batch_size, shape, peak_bytes=int(peak), allocator_bytes=held))
    return estimates


def estimate_peak(
    model: nn.Module | Callable[[], nn.Module],
    *,
    input_shape: Sequence[int],
    batch_size: int,
    num_classes: int,
    optimizer: str = "adamw",
    amp: str | None = None,
    allocator: AllocatorModel | None = None,
) -> Estimate:
    """Predict the peak tensor memory of one training step of ``model``, with no device and no real memory.

    The step (forward, cross-entropy, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``) is
    traced twice on fake cpu tensors and the second one is measured, so the optimizer state is counted
    as it is in every step after the first.

    Args:
        model: a module, copied onto fake tensors and left untouched, or better a factory such as
            ``lambda: timm.create_model("resnet50", num_classes=10)``, which is called under the fake mode
            so the model never takes real memory.
        input_shape: the shape of one sample, e.g. ``(3, 224, 224)``.
        batch_size: samples per step.
        num_classes: classes for the synthetic targets (the model's output size).
        optimizer: "adamw", "adam" or "sgd" (with momentum), as in `mps_autobatch.workload.OPTIMIZERS`.
        amp: None, "bf16" or "fp16" (autocast; fp16 without a GradScaler).
        allocator: a device's allocator rules (``backend.allocator_rules``) to replay the step's buffers
            through as well, for ``allocator_bytes``; None: tensors only.

    Returns:
        The `Estimate` for this batch size and input shape.

    Raises:
        ValueError: batch_size below 1, an empty or non-positive input_shape, num_classes below 1, or an
            unknown optimizer or amp.

    Example:
        >>> from torch import nn
        >>> est = estimate_peak(lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4)),
        ...                     input_shape=(3, 2, 2), batch_size=8, num_classes=4)
        >>> est
        Estimate(batch_size=8, input_shape=(3, 2, 2), peak_bytes=1676, allocator_bytes=None)
        >>> est.peak_bytes > 4 * (12 * 4 + 4) * 4  # at least parameters, gradients and two Adam moments
        True
    """
    (estimate,) = _trace(
        model,
        input_shapes=[input_shape],
        batch_sizes=[batch_size],
        num_classes=num_classes,
        optimizer=optimizer,
        amp=amp,
        allocator=allocator,
    )
    return estimate


def estimate_grid(
    model_factory: Callable[[], nn.Module],
    *,
    input_shapes: Sequence[Sequence[int]],
    batch_sizes: Sequence[int],
    num_classes: int,
    optimizer: str = "adamw",
    amp: str | None = None,
    channels_last: bool = False,
    allocator: AllocatorModel | None = None,
) -> list[Estimate]:
    """Predict the peak for every input shape and batch size, building the fake model only once.

    Cheaper than calling `estimate_peak` per point: one fake model and one state-creating step serve the
    whole grid, and tracing cost does not grow with batch or image size.

    Args:
        model_factory: builds the model, called once under the fake mode (e.g. a `timm.create_model` call).
        input_shapes: shapes of one sample, e.g. ``[(3, 224, 224), (3, 384, 384)]``.
        batch_sizes: samples per step.
        num_classes: classes for the synthetic targets.
        optimizer: "adamw", "adam" or "sgd".
        amp: None, "bf16" or "fp16".
        channels_last: the model and image batches in the channels-last memory format.
        allocator: allocator rules to replay each step's buffers through, as in `estimate_peak`.

    Returns:
        One `Estimate` per (input shape, batch size), shapes in the outer loop, in the order given.

    Raises:
        ValueError: as `estimate_peak`, for any of the shapes or sizes.

    Example:
        >>> from torch import nn
        >>> grid = estimate_grid(lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4)),
        ...                      input_shapes=[(3, 2, 2)], batch_sizes=[8, 64], num_classes=4)
        >>> [e.batch_size for e in grid]
        [8, 64]
        >>> grid[0].peak_bytes < grid[1].peak_bytes
        True
        >>> from mps_autobatch.allocator import MPS_ALLOCATOR  # each buffer takes at least a 16 KiB page
        >>> estimate_grid(lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), input_shapes=[(3, 2, 2)],
        ...               batch_sizes=[8], num_classes=4, allocator=MPS_ALLOCATOR)[0].allocator_bytes // 2**14
        16
    """
    return _trace(
        model_factory,
        input_shapes=input_shapes,
        batch_sizes=batch_sizes,
        num_classes=num_classes,
        optimizer=optimizer,
        amp=amp,
        channels_last=channels_last,
        allocator=allocator,
    )


def measure_peak(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    batch_size: int,
    num_classes: int,
    optimizer: str = "adamw",
    amp: str | None = None,
) -> int:
    """What `estimate_peak` predicts, measured: the same step run for real on the CPU.

    Counts live tensor bytes storage by storage (parameters included) at the peak of the second step,
    the first having created the optimizer state. The model's state is restored afterwards.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
        >>> measure_peak(model, input_shape=(3, 2, 2), batch_size=8, num_classes=4) == estimate_peak(
        ...     model, input_shape=(3, 2, 2), batch_size=8, num_classes=4).peak_bytes
        True
    """
    backend = CPUBackend()  # the repeatable CPU measure: live tensor bytes, storage by storage
    workload = make_workload(
        model,
        device=backend.device,
        input_shape=input_shape,
        num_classes=num_classes,
        optimizer=optimizer,
        amp=amp,  # type: ignore[arg-type]
    )
    with workload, backend.session(backend.limit().bytes):
        workload.step(batch_size)
        with backend.measure() as window:
            workload.step(batch_size)
    return window.peak_bytes or 0


@dataclass(frozen=True)
class Calibration:
    """What a device holds beyond the dry run's model of it, as a fixed amount plus an amount per sample.

    The dry run counts a step's tensors exactly at any size and, with the device's allocator rules, replays its
    buffers through a caching allocator (rounding and cache: what changes shape from one batch size to
    another). What is left is the device's own: Metal and MPSGraph memory or the CUDA context (fixed), and
    where its allocator differs from the rules (mostly more or less per sample); two real steps give both.

    Attributes:
        fixed_bytes: the device's memory beyond the model at zero samples (may be negative: rounding of the
            two readings, or an allocator that holds less than the rules say).
        per_sample_bytes: what each sample adds beyond the model.
        sizes: the batch sizes of the two real steps.
        measured_bytes: their measured device peaks.
        modelled_bytes: the dry run's model at the same sizes (`Estimate.modelled_bytes`).
        tensor_bytes: the dry run's tensor peaks at the same sizes.
        allocator: the allocator rules the model replayed (None: tensors alone); estimates to be calibrated
            must be traced with the same.
    """

    fixed_bytes: int
    per_sample_bytes: float
    sizes: tuple[int, int]
    measured_bytes: tuple[int, int]
    modelled_bytes: tuple[int, int]
    tensor_bytes: tuple[int, int]
    allocator: AllocatorModel | None = None

    @property
    def tensor_bytes_per_sample(self) -> float:
        """The dry run's tensor bytes per sample between the two sizes (what ``overhead_scale`` compares with:
        tensors grow with the batch in a straight line, where the allocator's model climbs in stairs)."""
        return (self.tensor_bytes[1] - self.tensor_bytes[0]) / (self.sizes[1] - self.sizes[0])

    def peak(self, modelled_bytes: int, batch_size: int, overhead_scale: float = 1.0) -> int:
        """The device peak of a step the dry run models at ``modelled_bytes`` for ``batch_size`` samples.

        ``overhead_scale``: how much more a sample of this step allocates than one of the calibrated step
        (its tensor bytes per sample over theirs), for another input size or setting.

        Example:
            >>> c = Calibration(fixed_bytes=100, per_sample_bytes=5.0, sizes=(8, 16), measured_bytes=(400, 700),
            ...                 modelled_bytes=(260, 520), tensor_bytes=(200, 400))
            >>> c.peak(1000, 32), c.peak(1000, 32, overhead_scale=2.0)
            (1260, 1420)
        """
        return int(modelled_bytes + self.fixed_bytes + self.per_sample_bytes * overhead_scale * batch_size)

    def predict(self, estimate: Estimate, overhead_scale: float = 1.0) -> int:
        """The device peak of an `Estimate` traced with this calibration's allocator rules.

        Raises:
            ValueError: the estimate was traced without them (or with them where the calibration has none).
        """
        if (estimate.allocator_bytes is None) != (self.allocator is None):
            raise ValueError(
                "The estimate and the calibration model the device differently: trace the estimate with "
                "allocator=calibration.allocator."
            )
        return self.peak(estimate.modelled_bytes, estimate.batch_size, overhead_scale)


def calibrate(
    model_factory: Callable[[], nn.Module],
    device: MemoryBackend,
    *,
    input_shape: Sequence[int],
    batch_size: int,
    num_classes: int,
    optimizer: str = "adamw",
    amp: str | None = None,
) -> Calibration:
    """Two real steps, at ``batch_size`` and twice it, against the dry run at the same sizes: a `Calibration`.

    Each step runs as a probe's trial does (after a warm-up at two samples from a settled device, from an empty
    cache) and
    its device peak is read; the dry run models the same steps with the device's allocator rules
    (``device.allocator_rules``: MPSAllocator's on a Mac; none elsewhere, where the model is the tensors
    alone), and what the device holds beyond the model at the two sizes gives a fixed part and a part per
    sample.

    Raises:
        AutobatchError: the device read no memory, or the two steps read the same.

    Example:
        >>> from mps_autobatch.simulate import simulated_backend
        >>> factory = lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
        >>> c = calibrate(factory, simulated_backend("mps:16GiB"), input_shape=(3, 4, 4), batch_size=64,
        ...               num_classes=10)
        >>> c.sizes, c.fixed_bytes // 2**20  # Metal's other allocations: the simulated Mac's 64 MiB
        ((64, 128), 64)
    """
    sizes = (batch_size, 2 * batch_size)
    rules = device.allocator_rules
    estimates = estimate_grid(
        model_factory,
        input_shapes=[tuple(input_shape)],
        batch_sizes=list(sizes),
        num_classes=num_classes,
        optimizer=optimizer,
        amp=amp,
        allocator=rules,
    )
    try:
        measured = measure_device_peaks(
            model_factory,
            device,
            input_shape=input_shape,
            batch_sizes=sizes,
            num_classes=num_classes,
            optimizer=optimizer,
            amp=amp,
        )
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the failed step's frames hold its tensors
        raise
    finally:
        device.clear_cache()  # as a probe does, once the model is gone: leave no cached buffers behind
    (e1, e2), (p1, p2) = (e.modelled_bytes for e in estimates), measured
    if p2 == p1:
        raise AutobatchError(
            f"The calibration steps at {sizes[0]} and {sizes[1]} read the same memory on {device.name}: the step's "
            "memory does not grow with the batch there. Calibrate at a larger --batch-size."
        )
    per_sample = ((p2 - e2) - (p1 - e1)) / (sizes[1] - sizes[0])
    return Calibration(
        fixed_bytes=int(p1 - e1 - per_sample * sizes[0]),
        per_sample_bytes=per_sample,
        sizes=sizes,
        measured_bytes=(p1, p2),
        modelled_bytes=(e1, e2),
        tensor_bytes=(estimates[0].peak_bytes, estimates[1].peak_bytes),
        allocator=rules,
    )


def measure_device_peaks(
    model_factory: Callable[[], nn.Module],
    device: MemoryBackend,
    *,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    num_classes: int,
    optimizer: str = "adamw",
    amp: str | None = None,
) -> list[int]:
    """The device peak of one real step at each size, as a probe's trials read it: after a warm-up at two
    samples from a settled device, each step from an empty cache. What `calibrate` measures, and what its
    predictions are checked against.

    Raises:
        AutobatchError: the device read no memory for a step.

    Example:
        >>> from mps_autobatch.simulate import simulated_backend
        >>> peaks = measure_device_peaks(lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 10)),
        ...     simulated_backend("mps:16GiB"), input_shape=(3, 4, 4), batch_sizes=[8, 64], num_classes=10)
        >>> [peak // 2**20 for peak in peaks]  # Metal's 64 MiB, and a few 16 KiB pages
        [64, 64]
    """
    workload = make_workload(
        model_factory(),
        device=device.device,
        input_shape=input_shape,
        num_classes=num_classes,
        optimizer=optimizer,
        amp=amp,  # type: ignore[arg-type]
    )
    measured = []
    with workload, device.session(device.limit().bytes):
        # As a probe's warm-up: a cache left by earlier work would hand the optimizer state oversized buffers.
        device.settle()
        workload.warm_up(WARM_UP_SAMPLES)
        for size in batch_sizes:
            device.clear_cache()
            with device.measure() as window:
                workload.step(size)
            if window.peak_bytes is None:
                raise AutobatchError(
                    f"{device.name} reported no memory for a step at batch size {size}: nothing to calibrate "
                    "against; drop --calibrate."
                )
            measured.append(window.peak_bytes)
    return measured
