"""What to change so a larger batch fits: each lever's predicted largest batch, best first, optionally verified.

A lever is one change to the training step: the model's own input size, bf16 or fp16 autocast, the
channels-last layout, SGD instead of Adam(W), or timm's gradient checkpointing. Each is predicted, not run:
the dry run (`mps_autobatch.estimate`) counts the step's tensor bytes with the lever applied, exactly, and
replays its buffers through the device's allocator rules (rounding and cache), and one calibration of the step
as given (two real steps near its own answer, `estimate.calibrate`) adds what the device holds beyond that, a
fixed amount plus an amount per sample scaled by the lever's bytes per sample. The largest batch is where the
sum meets the budget: a line through 1 and 2 samples guesses it, and the dry run is traced at pairs of sizes
around the guess until one fits and the next does not, since the allocator's rounding and pools make the peak
a staircase no line follows. With ``verify=True`` the top three are probed for real (`find_safe_batch_size`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import timm
from torch import nn

from ._units import format_bytes
from .allocator import AllocatorModel
from .devices import MemoryBackend, get_backend
from .estimate import Calibration, Estimate, calibrate, estimate_grid

__all__ = ["Advice", "Lever", "LeverName", "advise", "describe"]

LeverName = Literal["as_given", "image_size", "amp_bf16", "amp_fp16", "channels_last", "sgd", "grad_checkpointing"]


@dataclass(frozen=True)
class _Setup:
    """One training step's settings: the one given, or it with one lever applied."""

    image_size: int
    amp: str | None = None
    channels_last: bool = False
    optimizer: str = "adamw"
    grad_checkpointing: bool = False


@dataclass(frozen=True)
class Lever:
    """One change and what it is predicted to buy.

    Attributes:
        lever: its name ("image_size", "amp_bf16", ...; "as_given" is the step unchanged).
        change: the change in words.
        batch_size: the predicted largest batch within the budget (0: not even one sample).
        peak_bytes: the predicted device peak at the requested batch (without one: at ``batch_size``, or at one
            sample when not even one fits).
        measured_batch_size: a real probe's answer with ``verify``; None otherwise.
        note: what to know before pulling it.
    """

    lever: LeverName
    change: str
    batch_size: int
    peak_bytes: int
    measured_batch_size: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Advice:
    """The levers, best first (the largest predicted batch), and the ones left out with the reason.

    Attributes:
        model, image_size, optimizer, requested: what was asked about.
        device: the device the calibration ran on; ``limit_bytes`` its limit, ``budget_bytes`` after headroom.
        calibration: what the device holds beyond the dry run's model of it (fixed, and per sample).
        given: the step as given, predicted the same way.
        levers: the levers that apply, best first.
        left_out: (lever, why) for each lever that does not apply here.
    """

    model: str
    image_size: int
    optimizer: str
    requested: int | None
    device: str
    limit_bytes: int
    budget_bytes: int
    calibration: Calibration
    given: Lever
    levers: tuple[Lever, ...]
    left_out: tuple[tuple[LeverName, str], ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        """Plain data for JSON: ``{"levers": [{"lever", "batch_size", "peak_bytes", "measured_batch_size", ...}]}``."""

        def row(lever: Lever) -> dict[str, object]:
            return {
                "lever": lever.lever,
                "change": lever.change,
                "batch_size": lever.batch_size,
                "peak_bytes": lever.peak_bytes,
                "measured_batch_size": lever.measured_batch_size,
                "note": lever.note,
            }

        return {
            "model": self.model,
            "image_size": self.image_size,
            "optimizer": self.optimizer,
            "requested": self.requested,
            "device": self.device,
            "limit_bytes": self.limit_bytes,
            "budget_bytes": self.budget_bytes,
            "calibration": {
                "sizes": list(self.calibration.sizes),
                "fixed_bytes": self.calibration.fixed_bytes,
                "per_sample_bytes": round(self.calibration.per_sample_bytes),
            },
            "given": row(self.given),
            "levers": [row(lever) for lever in self.levers],
            "left_out": [{"lever": name, "why": why} for name, why in self.left_out],
        }


def _build(name: str, num_classes: int, grad_checkpointing: bool) -> nn.Module:
    model = timm.create_model(name, num_classes=num_classes)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)  # type: ignore[operator]
    return model


def _factory(name: str, num_classes: int, setup: _Setup) -> Callable[[], nn.Module]:
    return functools.partial(_build, name, num_classes, setup.grad_checkpointing)


class _DryRun:
    """The dry run's estimates for one timm model (`Estimate.modelled_bytes`, tensors), each size traced once."""

    def __init__(self, name: str, num_classes: int, allocator: AllocatorModel | None) -> None:
        self.name, self.num_classes, self.allocator = name, num_classes, allocator
        self._traced: dict[tuple[_Setup, int], Estimate] = {}

    def at(self, setup: _Setup, sizes: set[int] | tuple[int, ...]) -> dict[int, Estimate]:
        """``setup``'s step at each size; the sizes not traced before in one dry run."""
        todo = sorted(size for size in set(sizes) if (setup, size) not in self._traced)
        if todo:
            grid = estimate_grid(
                _factory(self.name, self.num_classes, setup),
                input_shapes=[(3, setup.image_size, setup.image_size)],
                batch_sizes=todo,
                num_classes=self.num_classes,
                optimizer=setup.optimizer,
                amp=setup.amp,
                channels_last=setup.channels_last,
                allocator=self.allocator,
            )
            self._traced.update({(setup, e.batch_size): e for e in grid})
        return {size: self._traced[setup, size] for size in sizes}


def _scale(tensors_per_sample: float, calibration: Calibration) -> float:
    """A step's tensor bytes per sample over the calibrated step's: how much more its samples leave beyond the
    model (tensors, unlike the allocator's model, grow in a straight line, so two small sizes give the slope)."""
    calibrated = calibration.tensor_bytes_per_sample
    return tensors_per_sample / calibrated if calibrated > 0 else 1.0


def _first_guess(one: Estimate, tensors_per_sample: float, calibration: Calibration, budget: int) -> int:
    """Where the model at one sample, growing by the tensors' slope, + what the device holds beyond it meets the
    budget (an overestimate where rounding and cache grow too, which the search then brackets)."""
    scale = _scale(tensors_per_sample, calibration)
    per_sample = tensors_per_sample + calibration.per_sample_bytes * scale
    room = budget - calibration.predict(one, scale)
    return 1 + max(0, math.floor(room / per_sample)) if per_sample > 0 else 1


def _predict(
    dry_run: _DryRun, setup: _Setup, calibration: Calibration, budget: int, requested: int | None
) -> tuple[int, int]:
    """The predicted largest batch and the predicted peak at ``requested`` (without one: at that batch, or at
    one sample when not even one fits).

    The tensors at 1 and 2 samples give a first guess. The allocator's model is a staircase (buffers change
    pool and rounding step as the batch grows), which no line through two points follows, so the answer is
    found on the model itself: it is traced at the guess and one more, and the next guess is where the nearest
    points on either side of the budget meet it (kept a quarter of the way inside, so the bracket shrinks),
    until a size fits and the next does not. Should `_ROUNDS` run out first, the largest size seen to fit is
    the answer: it fits, if not by the least margin.
    """
    traced = dry_run.at(setup, (1, 2))
    one = traced[1]
    tensors_per_sample = float(traced[2].peak_bytes - one.peak_bytes)
    scale = _scale(tensors_per_sample, calibration)
    peaks: dict[int, int] = {}

    def trace(sizes: set[int]) -> None:
        for size, estimate in dry_run.at(setup, sizes).items():
            peaks[size] = calibration.predict(estimate, scale)

    trace({1, 2})
    guess, best = _first_guess(one, tensors_per_sample, calibration, budget), 0
    for _ in range(_ROUNDS):
        trace({guess, guess + 1})
        best = max((size for size, peak in peaks.items() if peak <= budget), default=0)
        over = [size for size, peak in peaks.items() if peak > budget and size > best]
        if over and min(over) == best + 1:
            break  # also where not even one sample fits (best 0, over from 1)
        if not over:  # every size traced fits: go on along the widest secant, at most quadrupling
            low, high = min(peaks), max(peaks)
            slope = (peaks[high] - peaks[low]) / (high - low)
            step = (budget - peaks[high]) / slope if slope > 0 else 3 * high
            guess = high + max(1, min(3 * high, math.floor(step)))
        else:  # between the largest that fits and the smallest that does not: where their line meets the budget
            high = min(over)
            share = (budget - peaks[best]) / (peaks[high] - peaks[best])
            margin = max(1, (high - best) // 4)
            guess = min(max(best + math.floor(share * (high - best)), best + margin), high - margin)
            guess = max(best, min(guess, high - 2))  # the pair (guess, guess + 1) lies below high
    target = requested or max(best, 1)
    trace({target})
    return best, peaks[target]


_ROUNDS = 8
"""At most this many pairs of sizes are traced per lever (each round is one dry run of two sizes)."""


def _levers(
    name: str, given: _Setup, backend: MemoryBackend
) -> tuple[list[tuple[LeverName, str, _Setup, str]], list[tuple[LeverName, str]]]:
    """(name, change, setup, note) for each lever that applies, and (name, why) for each that does not."""
    applies: list[tuple[LeverName, str, _Setup, str]] = []
    left_out: list[tuple[LeverName, str]] = []
    config = timm.get_pretrained_cfg(name)
    native = config.input_size[-1] if config is not None and config.input_size else None
    if native is None:
        left_out.append(("image_size", f"timm has no default input size for {name}"))
    elif native >= given.image_size:
        left_out.append(("image_size", f"{given.image_size} px is already at or under {name}'s own {native} px"))
    else:
        note = (
            f"{name} was pretrained at {native} px; for classification a larger input rarely helps as much as it "
            f"costs: activations grow with the pixels, {(given.image_size / native) ** 2:.1f}x here"
        )
        applies.append(("image_size", f"--image-size {native}", replace(given, image_size=native), note))
    for dtype in ("bf16", "fp16"):
        lever: LeverName = "amp_bf16" if dtype == "bf16" else "amp_fp16"
        try:
            chosen = backend.choose_amp(dtype)
        except ValueError as exc:
            left_out.append((lever, str(exc).split(". ")[0]))
            continue
        if chosen == dtype:
            note = "fp16 needs a GradScaler (the trainer adds one)" if dtype == "fp16" else ""
            applies.append((lever, f"--amp {dtype}", replace(given, amp=dtype), note))
    applies.append(
        (
            "channels_last",
            "--channels-last",
            replace(given, channels_last=True),
            "the same bytes in another layout: it changes speed on GPUs more than memory",
        )
    )
    if given.optimizer in ("adamw", "adam"):
        note = "optimizer state 2x -> 1x the parameters; SGD needs its own learning rate schedule"
        applies.append(("sgd", "--optimizer sgd (momentum 0.9)", replace(given, optimizer="sgd"), note))
    else:
        left_out.append(("sgd", f"the optimizer is already {given.optimizer}"))
    model = _build(name, 1, False)
    try:
        model.set_grad_checkpointing(True)  # type: ignore[operator]
    except (AttributeError, NotImplementedError, AssertionError) as exc:
        left_out.append(("grad_checkpointing", f"{name} has no gradient checkpointing in timm ({type(exc).__name__})"))
    else:
        note = "recomputes activations in backward: about 20-30 % more time per step"
        applies.append(
            ("grad_checkpointing", "model.set_grad_checkpointing(True)", replace(given, grad_checkpointing=True), note)
        )
    return applies, left_out


def advise(
    model: str,
    *,
    image_size: int,
    requested: int | None = None,
    device: str | MemoryBackend = "auto",
    memory_limit: int | None = None,
    headroom: float = 0.2,
    optimizer: str = "adamw",
    num_classes: int = 1000,
    verify: bool = False,
) -> Advice:
    """Rank the levers that make a larger batch fit a timm model's training step on ``device``.

    Args:
        model: a timm model name.
        image_size: the input size as the step uses it now.
        requested: the batch you want: each lever's predicted peak is at it.
        device: where to calibrate (and verify): "auto", "mps", "cuda", "cpu" or a backend such as
            ``simulated_backend("mps:16GiB")``.
        memory_limit: bytes to hold the step to (default: the device's limit).
        headroom: the fraction of the limit kept free, as the probe keeps it.
        optimizer: "adamw", "adam" or "sgd", as the step uses it now.
        num_classes: classes of the model's head.
        verify: also probe the top three levers for real and fill ``measured_batch_size``.

    Raises:
        ValueError: ``requested`` below 1.

    Example (about 30 s on a 2-core CPU; tests/test_advise.py runs it)::

        from mps_autobatch import advise
        from mps_autobatch.simulate import simulated_backend

        advice = advise("test_efficientnet", image_size=256, device=simulated_backend("mps:16GiB"),
                        memory_limit=384 * 2**20, num_classes=10)
        advice.levers[0].lever      # "image_size": --image-size 160 fits the most
    """
    if requested is not None and requested < 1:
        raise ValueError(f"requested must be >= 1, got {requested}. Pass the batch you want, or None.")
    backend = get_backend(device)
    limit = backend.limit(memory_limit)
    budget = int(limit.bytes * (1 - headroom))
    given = _Setup(image_size=image_size, optimizer=optimizer)

    # Calibrate on the step as given, near its own answer: first at an eighth of what the model alone allows,
    # then, from that prediction, at half the given step's batch and at the batch itself.
    def calibrated_at(batch_size: int) -> Calibration:
        return calibrate(
            _factory(model, num_classes, given),
            backend,
            input_shape=(3, image_size, image_size),
            batch_size=max(1, batch_size),
            num_classes=num_classes,
            optimizer=optimizer,
        )

    dry_run = _DryRun(model, num_classes, backend.allocator_rules)  # calibrate models the device the same way
    traced = dry_run.at(given, (1, 2))
    one, tensors_per_sample = traced[1], float(traced[2].peak_bytes - traced[1].peak_bytes)
    room = budget - one.modelled_bytes
    model_alone = 1 + math.floor(room / tensors_per_sample) if room > 0 and tensors_per_sample > 0 else 0
    calibration = calibrated_at(model_alone // 8)
    near = _first_guess(one, tensors_per_sample, calibration, budget) // 2  # near enough to calibrate at
    if near > calibration.sizes[0]:
        calibration = calibrated_at(near)

    def lever_of(name: LeverName, change: str, setup: _Setup, note: str) -> Lever:
        size, peak = _predict(dry_run, setup, calibration, budget, requested)
        return Lever(name, change, size, peak, note=note)

    as_given = lever_of("as_given", "nothing", given, "")
    applies, left_out = _levers(model, given, backend)
    setups = {name: setup for name, _, setup, _ in applies}
    ranked = sorted((lever_of(*lever) for lever in applies), key=lambda lever: -lever.batch_size)
    if verify:
        ranked = [
            replace(
                lever,
                measured_batch_size=_probe(model, num_classes, setups[lever.lever], backend, limit.bytes, headroom),
            )
            if index < 3
            else lever
            for index, lever in enumerate(ranked)
        ]
    return Advice(
        model=model,
        image_size=image_size,
        optimizer=optimizer,
        requested=requested,
        device=backend.name,
        limit_bytes=limit.bytes,
        budget_bytes=budget,
        calibration=calibration,
        given=as_given,
        levers=tuple(ranked),
        left_out=tuple(left_out),
    )


def _probe(name: str, num_classes: int, setup: _Setup, backend: MemoryBackend, limit: int, headroom: float) -> int:
    from .probe import find_safe_batch_size

    result = find_safe_batch_size(
        _build(name, num_classes, setup.grad_checkpointing),
        input_shape=(3, setup.image_size, setup.image_size),
        num_classes=num_classes,
        optimizer=setup.optimizer,
        amp=setup.amp,  # type: ignore[arg-type]
        channels_last=setup.channels_last,
        device=backend,
        memory_limit=limit,
        headroom=headroom,
        cache=False,
    )
    return result.batch_size


def describe(advice: Advice) -> list[str]:
    """The advice as plain lines, best lever first.

    Example:
        >>> line = Calibration(0, 0.0, (1, 2), (1, 2), (1, 2), (1, 2))
        >>> lines = describe(Advice("m", 1024, "adamw", None, "cpu", 2**30, 2**29, line,
        ...     Lever("as_given", "nothing", 2, 2**28), (Lever("image_size", "--image-size 224", 40, 2**28),)))
        >>> lines[1]
        '1. image_size (--image-size 224): batch 40 (20.0x), peak 256.00 MiB at 40'
    """
    lines = [
        f"As given ({advice.model} @ {advice.image_size} px, {advice.optimizer}): batch {advice.given.batch_size} "
        f"within {format_bytes(advice.budget_bytes)} on {advice.device}"
    ]
    for rank, lever in enumerate(advice.levers, start=1):
        gain = f" ({lever.batch_size / advice.given.batch_size:.1f}x)" if advice.given.batch_size else ""
        where = f"at {advice.requested}" if advice.requested is not None else f"at {lever.batch_size}"
        peak = format_bytes(lever.peak_bytes)
        line = f"{rank}. {lever.lever} ({lever.change}): batch {lever.batch_size}{gain}, peak {peak} {where}"
        if lever.measured_batch_size is not None:
            line += f"; measured {lever.measured_batch_size}"
        lines.append(line)
        if lever.note:
            lines.append(f"   {lever.note}")
    for name, why in advice.left_out:
        lines.append(f"Left out: {name}: {why}.")
    return lines
