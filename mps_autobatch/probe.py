"""`find_safe_batch_size`: the settings as a `ProbeSpec`, the cache, the device backend, the workload, the search."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import distributed
from ._units import parse_size
from .breakdown import memory_breakdown
from .devices import MemoryBackend, MemoryLimit, get_backend
from .inputs import DEFAULT_MAX_SAMPLES, WorstCase, describe, worst_case
from .results import ProbeResult, Trial
from .search import search
from .spec import ProbeSpec
from .workload import OptimizerSpec, make_workload, model_and_optimizer

__all__ = ["find_safe_batch_size", "module_fingerprint"]

Target = nn.Module | Callable[[int], object] | str


def module_fingerprint(model: nn.Module) -> str:
    """A short hash of a module's architecture: its module tree, and each parameter's and buffer's shape and dtype.

    Two instances of one architecture share it whatever their weights; any change of layer, width or dtype
    changes it. It names a module in the probe cache.

    Example:
        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> module_fingerprint(a) == module_fingerprint(b), module_fingerprint(a) == module_fingerprint(nn.Linear(4, 3))
        (True, False)
    """
    parts = [repr(model)]
    parts += [f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for name, p in model.named_parameters()]
    parts += [f"{name}:{tuple(b.shape)}:{b.dtype}" for name, b in model.named_buffers()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _optimizer_name(optimizer: OptimizerSpec | None) -> str:
    if optimizer is None:
        return "adamw"
    if isinstance(optimizer, str):
        return optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return f"custom:{type(optimizer).__name__}"
    return f"custom:{getattr(optimizer, '__qualname__', type(optimizer).__name__)}"


def _only_spec(spec: ProbeSpec, settings: ProbeSpec, optimizer: OptimizerSpec | None) -> ProbeSpec:
    """``spec``, refusing settings also given as keywords; an optimizer object names the spec's optimizer."""
    defaults = ProbeSpec(optimizer=settings.optimizer if not isinstance(optimizer, str) else "adamw")
    # The example itself travels as a keyword either way; the spec holds its description.
    names = [f.name for f in dataclasses.fields(ProbeSpec) if f.name != "example"]
    clashes = [name for name in names if getattr(settings, name) != getattr(defaults, name)]
    if clashes:
        raise TypeError(
            f"Pass the probe's settings either as spec= or as keyword arguments, not both: {', '.join(clashes)} "
            "given as keywords too. Put them in the spec."
        )
    spec = dataclasses.replace(spec, example=settings.example) if settings.example is not None else spec
    if optimizer is None or isinstance(optimizer, str):
        return spec
    return dataclasses.replace(spec, optimizer=settings.optimizer)  # the optimizer that runs is what is cached


def _check_cacheable(
    target: object, spec: ProbeSpec, loss_fn: object, optimizer: OptimizerSpec | None, collate_fn: object
) -> None:
    """Without a ``cache_key``, the key must hold everything that runs: refuse what it cannot name."""
    if not isinstance(target, (str, nn.Module)) and spec.model is None:
        raise ValueError(
            "cache needs cache_key='...' for a step function: a name for what it trains, e.g. "
            "cache_key='my-bert-seq512'. Pass one, or leave the cache off."
        )
    factory = optimizer is not None and not isinstance(optimizer, (str, torch.optim.Optimizer))
    if loss_fn is not None or factory or collate_fn is not None:
        what = "a loss_fn" if loss_fn is not None else "an optimizer factory" if factory else "a collate_fn"
        raise ValueError(
            f"cache needs cache_key='...' with {what}: its code is not part of the cache key, so another one "
            "would get this answer. Pass a cache_key that names it, or leave the cache off."
        )


def _identity(target: object, spec: ProbeSpec, cache_key: str | None) -> str | None:
    """What names the target in the cache: a timm name, a module's fingerprint, or the caller's key."""
    if cache_key is not None:
        if not isinstance(cache_key, str) or not cache_key:
            raise TypeError(f"cache_key must be a non-empty string, got {cache_key!r}.")
        return cache_key
    if isinstance(target, str):
        return target
    if isinstance(target, nn.Module):
        return f"{type(target).__name__}:{module_fingerprint(target)}"
    return spec.model


def find_safe_batch_size(
    target: Target,
    *,
    input_shape: Sequence[int] | None = None,
    example: Any = None,
    dataset: Sequence[Any] | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    mode: Literal["train", "eval"] = "train",
    num_classes: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: OptimizerSpec | None = None,
    amp: Literal["bf16", "fp16"] | None = None,
    channels_last: bool = False,
    device: str | MemoryBackend = "auto",
    memory_limit: int | str | None = None,
    headroom: float = 0.2,
    requested: int | None = None,
    start: int | None = None,
    max_batch_size: int | None = None,
    multiple_of: int = 1,
    steps_per_trial: int = 1,
    find_max: bool = False,
    objective: Literal["memory", "throughput"] = "memory",
    on_trial: Callable[[Trial], None] | None = None,
    model: nn.Module | None = None,
    spec: ProbeSpec | None = None,
    cache: bool | str | Path = False,
    cache_key: str | None = None,
    isolate: bool = False,
    trial_timeout_s: float = 600.0,
) -> ProbeResult:
    """Find the largest batch size a training step can use without running out of memory.

    Runs real training steps (forward, backward, optimizer) at a few batch sizes, reads the device's
    memory counters against its limit, fits peak memory against batch size, and returns the largest
    size whose *measured* peak fits the budget ``limit x (1 - headroom)``. On MPS the probe sets the
    per-process memory fraction to the limit while it runs, so an overshoot raises instead of swapping,
    and restores it afterwards.

    Args:
        target: a timm model name (built without weights), an ``nn.Module`` (steps on batches of ``input_shape``
            or of copies of ``example``; its weights, buffers, gradients and the RNG are put back afterwards), or a
            function ``step(batch_size)`` that runs one full training step itself and creates its batch inside:
            only what is allocated inside the step is measured, so a batch built once outside it and reused is
            not, and the answer would be too large. A step function is called once at a tiny size first
            (uncounted, so the optimizer state exists), then once per trial; it steps the real weights on its
            data, so without ``model``/``optimizer`` they end the probe changed. After an out-of-memory error the
            gradients of the modules that ran and the optimizer state the failed step created are dropped.
        input_shape: one sample's shape for a module, e.g. ``(3, 224, 224)``: random images and synthetic targets.
        example: one real sample, batched by stacking copies (torch's ``default_collate``, or ``collate_fn``):
            a dict is fed as ``model(**batch)`` with the loss from ``loss_fn(output, batch)`` or the output's
            ``.loss``/``["loss"]``; an ``(inputs, target)`` pair as ``model(inputs)`` (``model(*inputs)`` for a
            tuple) with ``loss_fn(output, target)`` or cross-entropy; a tensor as ``model(x)`` with synthetic
            targets. Instead of ``input_shape``.
        dataset: a map-style dataset: the example is its worst case, the sample with the most values (e.g. the
            longest sequence), over at most ``max_samples`` samples evenly spread; ``ProbeResult.example_index``
            says which. An explicit ``example`` wins.
        collate_fn: batches a list of copies of the example (e.g. a padding collator).
        max_samples: how many samples of ``dataset`` are read at most to find the worst case (10,000).
        mode: "train" sizes a training step; "eval" the forward alone under ``torch.inference_mode()`` with
            ``model.eval()`` and no optimizer state: the evaluation/inference batch size.
        num_classes: classes for synthetic targets (default: the model's ``num_classes``).
        loss_fn: ``loss_fn(output, target)`` (``loss_fn(output, batch)`` for a dict example); default
            cross-entropy, or the output's own loss for a dict.
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
        start: the first size probed instead (default: 80% of ``requested``, else 2).
        max_batch_size: never probe above this (e.g. the dataset length).
        multiple_of: only probe and recommend multiples of this.
        steps_per_trial: training steps per probe; the peak is the highest of them.
        find_max: also find the largest size that runs at all, exactly; ``batch_size`` stays what it is without.
        objective: "memory" recommends the largest size that fits; "throughput" the smallest size within
            5% of the best samples/s among those that fit (larger is not always faster on MPS).
        on_trial: called with each `Trial` as it completes (for progress displays).
        model: for a step function, the module it trains: saved before the probe and restored after it.
        spec: all the settings above (``input_shape`` to ``objective``) as one `ProbeSpec`, instead of keywords.
        cache: reuse an answer found before for the same settings on this device, under a limit no larger than
            today's, and store new answers: True for the user cache folder (``$AUTOBATCH_CACHE_DIR`` when set),
            or a folder. ``ProbeResult.cached`` says whether the answer came from it. A timm name is looked up
            before any model is built; a module is named by its architecture's fingerprint.
        cache_key: names a step function in the cache (required with ``cache`` for one).
        isolate: probe in a child process, so a Metal abort or a hang marks a size too big instead of killing
            this process (a timm name only; see `find_safe_batch_size_isolated` for a factory).
        trial_timeout_s: with ``isolate``, seconds a trial may run before its size counts as too big.

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

        The same probe again, from the cache:

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     first, again = (find_safe_batch_size(model, input_shape=(3, 32, 32), num_classes=10, cache=folder,
        ...                     device=simulated_backend("mps:16GiB"), memory_limit="1GiB") for _ in range(2))
        >>> first.cached, again.cached, again.batch_size == first.batch_size
        (False, True, True)

        A text model's dict sample, in eval mode:

        >>> class Classifier(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed, self.head = torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 2)
        ...     def forward(self, input_ids, attention_mask):
        ...         return self.head((self.embed(input_ids) * attention_mask[..., None]).mean(1))
        >>> sample = {"input_ids": torch.zeros(128, dtype=torch.long), "attention_mask": torch.ones(128)}
        >>> result = find_safe_batch_size(Classifier(), example=sample, mode="eval",
        ...                               device=simulated_backend("mps:16GiB"), memory_limit="256MiB")
        >>> result.mode, result.batch_size > 1000
        ('eval', True)
    """
    if isinstance(target, type):
        raise TypeError(
            f"target is the class {target.__name__}, not a model: pass an instance, e.g. {target.__name__}(...), "
            "or a step(batch_size) function."
        )
    picked = None
    if example is None and dataset is not None:
        if input_shape is not None:
            raise ValueError("Pass input_shape or dataset, not both: the dataset's samples give the shape.")
        picked = worst_case(dataset, max_samples)
        example = picked.example
    settings = ProbeSpec(
        input_shape=input_shape,  # type: ignore[arg-type]
        example=describe(example) if example is not None else None,
        mode=mode,
        num_classes=num_classes,
        optimizer=_optimizer_name(optimizer),
        amp=amp,
        channels_last=channels_last,
        memory_limit=parse_size(memory_limit) if memory_limit is not None else None,
        headroom=headroom,
        requested=requested,
        start=start,
        max_batch_size=max_batch_size,
        multiple_of=multiple_of,
        steps_per_trial=steps_per_trial,
        find_max=find_max,
        objective=objective,
    )
    spec = settings if spec is None else _only_spec(spec, settings, optimizer)
    if isinstance(target, str) and spec.input_shape is None and example is None:
        raise ValueError(f"input_shape is needed to probe {target!r}, e.g. input_shape=(3, 224, 224).")
    if cache and cache_key is None:
        _check_cacheable(target, spec, loss_fn, optimizer, collate_fn)
    spec = dataclasses.replace(spec, model=_identity(target, spec, cache_key))
    backend = get_backend(device)
    limit = _split_between_local_ranks(
        backend, backend.limit(spec.memory_limit), explicit=spec.memory_limit is not None
    )
    backend.check_can_run(limit.bytes)
    key = spec.cache_key(backend.identity()) if cache else None
    folder = Path(cache) if isinstance(cache, (str, Path)) and not isinstance(cache, bool) else None
    if key is not None:
        from . import cache as disk

        # Under torchrun rank 0 reads the cache and tells the others, so every rank probes, or none does.
        hit = distributed.rank_zero_decides(functools.partial(disk.load, key, limit.bytes, folder=folder))
        if hit is not None:
            return with_worst_case(dataclasses.replace(hit, cached=True), picked)
    if isolate:
        if example is not None:
            raise TypeError("isolate=True builds its batches from input_shape: pass input_shape, not example/dataset.")
        result = _isolated(target, spec, backend, on_trial, trial_timeout_s)
    else:
        result = _probe(
            target,
            spec,
            backend,
            limit,
            example=example,
            collate_fn=collate_fn,
            loss_fn=loss_fn,
            optimizer=optimizer,
            model=model,
            on_trial=on_trial,
        )
    result = dataclasses.replace(result, mode=spec.mode)
    if spec.mode == "eval":
        result = dataclasses.replace(result, accumulation=None)  # evaluation accumulates nothing
    result = with_worst_case(result, picked)
    if key is not None and distributed.rank_and_world()[0] == 0:
        from . import cache as disk

        disk.store(key, result, folder=folder)
    return result


def with_worst_case(result: ProbeResult, picked: WorstCase | None) -> ProbeResult:
    """The result with the worst-case sample it was built from (a cached answer too: the key holds its shape).

    Used by every path that picks one: ``dataset=``, the Lightning callback and the HF Trainer hook.
    """
    if picked is None or result.example_index == picked.index:
        return result
    if picked.total == 1:  # nothing was picked among others (an iterable loader's first sample)
        return dataclasses.replace(result, example_index=picked.index)
    note = f"{result.note} " if result.note else ""
    return dataclasses.replace(result, example_index=picked.index, note=f"{note}{picked.describe().capitalize()}.")


def _probe(
    target: Target,
    spec: ProbeSpec,
    backend: MemoryBackend,
    limit: MemoryLimit,
    *,
    example: Any,
    collate_fn: Callable[[list[Any]], Any] | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    optimizer: OptimizerSpec | None,
    model: nn.Module | None,
    on_trial: Callable[[Trial], None] | None,
) -> ProbeResult:
    if isinstance(target, str):
        from .models import create_model

        target = create_model(target, spec.num_classes)
    assert not isinstance(target, str)
    # A module steps with the spec's optimizer unless given one; a step function brings its own.
    runs = optimizer if optimizer is not None or not isinstance(target, nn.Module) else spec.optimizer
    workload = make_workload(
        target,
        device=backend.device,
        input_shape=spec.input_shape,
        example=example,
        collate_fn=collate_fn,
        mode=spec.mode,
        num_classes=spec.num_classes,
        loss_fn=loss_fn,
        optimizer=runs,
        amp=spec.amp,
        channels_last=spec.channels_last,
        grad_scaler=backend.uses_grad_scaler,
        model=model,
    )
    try:
        with workload, backend.session(limit.bytes):
            result = search(
                workload,
                backend,
                limit,
                headroom=float(spec.headroom),
                requested=spec.requested,
                start=spec.start,
                max_batch_size=spec.max_batch_size,
                multiple_of=spec.multiple_of,
                steps_per_trial=spec.steps_per_trial,
                find_max=spec.find_max,
                objective=spec.objective,
                on_trial=on_trial,
            )
            result = dataclasses.replace(result, mode=spec.mode)
            # While the probe's optimizer state still exists: the workload puts the caller's back on exit.
            return dataclasses.replace(result, breakdown=memory_breakdown(result, *model_and_optimizer(workload)))
    except BaseException as exc:
        # The failed step's frames hold its batch and activations until the caller lets go of the error, and
        # would then land in the cache emptied below: free them now (the traceback keeps its lines).
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        backend.clear_cache()  # after the workload let go of its optimizer: leave no cached buffers behind


def _isolated(
    target: Target,
    spec: ProbeSpec,
    backend: MemoryBackend,
    on_trial: Callable[[Trial], None] | None,
    trial_timeout_s: float,
) -> ProbeResult:
    if not isinstance(target, str):
        raise TypeError(
            "isolate=True needs a timm model name to build in the child process; for a module or a step function "
            "call find_safe_batch_size_isolated(factory, ...) with a picklable factory."
        )
    from .isolate import find_safe_batch_size_isolated
    from .models import check_model_name, create_model

    check_model_name(target)  # here, with its own message, rather than in the child
    factory = functools.partial(create_model, target, spec.num_classes)
    return find_safe_batch_size_isolated(
        factory, trial_timeout_s=trial_timeout_s, spec=spec, device=backend, on_trial=on_trial
    )


def _split_between_local_ranks(backend: MemoryBackend, limit: MemoryLimit, *, explicit: bool) -> MemoryLimit:
    """Under torchrun, ranks on one host share its RAM (CPU, a Mac): each gets its share of the default limit.

    An explicit ``memory_limit`` is taken as this rank's own.
    """
    ranks = distributed.local_world_size()
    if explicit or ranks == 1 or not backend.shares_host_memory:
        return limit
    return MemoryLimit(limit.bytes // ranks, f"{limit.source}, split between {ranks} ranks on this host")
