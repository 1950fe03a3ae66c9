"""`find_safe_batch_size`: check the arguments, pick the device backend, build the workload, search."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from . import distributed
from ._units import parse_size
from .devices import MemoryBackend, MemoryLimit, get_backend
from .results import ProbeResult, Trial
from .search import search
from .step import AMP_DTYPES
from .workload import OptimizerSpec, make_workload

__all__ = ["find_safe_batch_size"]


def _check_positive(name: str, value: int | None, fix: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}. {fix}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}. {fix}")


def _check_arguments(
    headroom: float,
    requested: int | None,
    max_batch_size: int | None,
    multiple_of: int,
    steps_per_trial: int,
    amp: str | None,
    objective: str,
) -> None:
    _check_positive("requested", requested, "Pass the batch size you want, or leave it out to search from small.")
    _check_positive("max_batch_size", max_batch_size, "Pass the largest size worth probing, e.g. the dataset length.")
    _check_positive("multiple_of", multiple_of, "Pass 1 for any size, or e.g. 8 for multiples of 8.")
    _check_positive("steps_per_trial", steps_per_trial, "Pass 1 or more.")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}. The default 0.2 keeps 20% free.")
    if max_batch_size is not None and max_batch_size < multiple_of:
        raise ValueError(
            f"max_batch_size {max_batch_size} is below multiple_of {multiple_of}: no size is allowed. "
            "Raise max_batch_size or lower multiple_of."
        )
    if objective not in ("memory", "throughput"):
        raise ValueError(f"Unknown objective {objective!r}. Use 'memory' or 'throughput'.")
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"Unknown amp {amp!r}. Use None, 'bf16' or 'fp16'.")


def find_safe_batch_size(
    target: nn.Module | Callable[[int], object],
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: OptimizerSpec | None = None,
    amp: Literal["bf16", "fp16"] | None = None,
    channels_last: bool = False,
    device: str | MemoryBackend = "auto",
    memory_limit: int | str | None = None,
    headroom: float = 0.2,
    requested: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    steps_per_trial: int = 1,
    find_max: bool = False,
    objective: Literal["memory", "throughput"] = "memory",
    on_trial: Callable[[Trial], None] | None = None,
    model: nn.Module | None = None,
) -> ProbeResult:
    """Find the largest batch size a training step can use without running out of memory.

    Runs real training steps (forward, backward, optimizer) at a few batch sizes, reads the device's
    memory counters against its limit, fits peak memory against batch size, and returns the largest
    size whose *measured* peak fits the budget ``limit x (1 - headroom)``. On MPS the probe sets the
    per-process memory fraction to the limit while it runs, so an overshoot raises instead of swapping,
    and restores it afterwards.

    Args:
        target: an ``nn.Module`` (steps on synthetic batches of ``input_shape``; its weights, buffers,
            gradients and the RNG are put back afterwards), or a function ``step(batch_size)`` that runs
            one full training step itself and creates its batch inside (only what is allocated inside the
            probe is measured). A step function is called once at a tiny size first (uncounted, so the
            optimizer state exists), then once per trial; it steps the real weights on its data, so
            without ``model``/``optimizer`` they end the probe changed. After an out-of-memory error the
            gradients of the modules that ran and the optimizer state the failed step created are dropped.
        input_shape: one sample's shape for a module, e.g. ``(3, 224, 224)``.
        num_classes: classes for synthetic targets (default: the model's ``num_classes``).
        loss_fn: ``loss_fn(output, target)``; default cross-entropy.
        optimizer: for a module, "adamw" (default), "adam", "sgd", an optimizer over its parameters, or a
            factory; for a step function, the optimizer it steps, saved and restored bit for bit.
        amp: None, "bf16" or "fp16" autocast.
        channels_last: channels-last memory format for the module and the batch.
        device: "auto" (MPS, then CUDA, then CPU), "mps", "cuda", "cuda:N", "cpu", or a backend object
            such as `mps_autobatch.simulate.simulated_backend("mps:16GiB")`.
        memory_limit: bytes or a size such as "8GiB"; default: what the device allows (see README).
        headroom: the fraction of the limit kept free (the 20%-reduction rule by default).
        requested: the batch size you want; the search starts at 80% of it, and the result says how to
            reach it with gradient accumulation.
        max_batch_size: never probe above this (e.g. the dataset length).
        multiple_of: only probe and recommend multiples of this.
        steps_per_trial: training steps per probe; the peak is the highest of them.
        find_max: also find the largest size that runs at all, exactly; ``batch_size`` stays what it is without.
        objective: "memory" recommends the largest size that fits; "throughput" the smallest size within
            5% of the best samples/s among those that fit (larger is not always faster on MPS).
        on_trial: called with each `Trial` as it completes (for progress displays).
        model: for a step function, the module it trains: saved before the probe and restored after it.

    Returns:
        A `ProbeResult`: ``batch_size`` (recommended), ``max_batch_size`` (largest verified), the limit,
        the budget, the fitted line and every trial.

    Raises:
        NoBatchSizeFits: not even the smallest size fits.
        ValueError, TypeError: a bad argument, before any trial.
        Exception: any error of the step that is not out-of-memory, unchanged.

    Example:
        >>> import torch
        >>> from mps_autobatch import find_safe_batch_size
        >>> from mps_autobatch.simulate import simulated_backend
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        >>> result = find_safe_batch_size(model, input_shape=(3, 32, 32), num_classes=10,
        ...                               device=simulated_backend("mps:16GiB"), memory_limit="1GiB")
        >>> result.batch_size > 1000, result.trials[-1].peak_bytes <= result.limit_bytes
        (True, True)
    """
    _check_arguments(headroom, requested, max_batch_size, multiple_of, steps_per_trial, amp, objective)
    limit_bytes = parse_size(memory_limit) if memory_limit is not None else None
    backend = get_backend(device)
    limit = _split_between_local_ranks(backend, backend.limit(limit_bytes), explicit=limit_bytes is not None)
    workload = make_workload(
        target,
        device=backend.device,
        input_shape=input_shape,
        num_classes=num_classes,
        loss_fn=loss_fn,
        optimizer=optimizer,
        amp=amp,
        channels_last=channels_last,
        model=model,
    )
    try:
        with workload, backend.session(limit.bytes):
            result = search(
                workload,
                backend,
                limit,
                headroom=float(headroom),
                requested=requested,
                max_batch_size=max_batch_size,
                multiple_of=multiple_of,
                steps_per_trial=steps_per_trial,
                find_max=find_max,
                objective=objective,
                on_trial=on_trial,
            )
    except BaseException as exc:
        # The failed step's frames hold its batch and activations until the caller lets go of the error, and
        # would then land in the cache emptied below: free them now (the traceback keeps its lines).
        traceback.clear_frames(exc.__traceback__)
        if isinstance(exc, Exception):
            distributed.share_failure(exc)  # the other ranks stop with it instead of waiting for this one
        raise
    finally:
        backend.clear_cache()  # after the workload let go of its optimizer: leave no cached buffers behind
    return distributed.agree_on_probe(result)


def _split_between_local_ranks(backend: MemoryBackend, limit: MemoryLimit, *, explicit: bool) -> MemoryLimit:
    """Under torchrun, ranks on one host share its RAM (CPU, a Mac): each gets its share of the default limit.

    An explicit ``memory_limit`` is taken as this rank's own.
    """
    ranks = distributed.local_world_size()
    if explicit or ranks == 1 or not backend.shares_host_memory:
        return limit
    return MemoryLimit(limit.bytes // ranks, f"{limit.source}, split between {ranks} ranks on this host")
