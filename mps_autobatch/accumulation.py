"""Keep an optimisation batch that does not fit by splitting it into micro-batches (gradient accumulation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["EffectivePlan", "micro_batch_sizes", "plan_accumulation", "plan_effective_batch"]

DIVISOR_FLOOR = 0.8
"""A divisor of the effective batch is used when it is at least this share of the largest size that fits."""


def plan_accumulation(requested: int, safe: int) -> tuple[int, int]:
    """Split a requested batch into as few micro-batches as fit, of near-equal size.

    The sizes add up to ``requested`` exactly: every micro-batch has ``micro`` samples except the last,
    which may be smaller (``requested - micro * (steps - 1)``). To get the gradient of the mean loss over
    the whole batch, scale each micro-batch's mean loss by ``len(micro_batch) / requested`` before
    ``backward()`` (not by ``1 / steps``, which would over-weight a short last micro-batch).

    Args:
        requested: the optimisation batch the caller wants.
        safe: the largest micro-batch that fits (``ProbeResult.batch_size``).

    Returns:
        ``(micro, steps)``: the micro-batch size and the number of accumulation steps.

    Raises:
        ValueError: either size is below 1.

    Example:
        >>> plan_accumulation(32, 24)   # two micro-batches of 16
        (16, 2)
        >>> plan_accumulation(50, 24)   # 17 + 17 + 16
        (17, 3)
        >>> plan_accumulation(16, 24)   # fits as it is
        (16, 1)
    """
    if requested < 1 or safe < 1:
        raise ValueError(f"Batch sizes must be >= 1, got requested={requested}, safe={safe}. Pass positive sizes.")
    steps = math.ceil(requested / safe)
    micro = math.ceil(requested / steps)
    return micro, steps


def micro_batch_sizes(requested: int, micro: int) -> list[int]:
    """The sizes of the micro-batches that make up ``requested``, the last one possibly smaller.

    Example:
        >>> micro_batch_sizes(50, 17)
        [17, 17, 16]
    """
    if requested < 1 or micro < 1:
        raise ValueError(f"Batch sizes must be >= 1, got requested={requested}, micro={micro}.")
    full, rest = divmod(requested, micro)
    return [micro] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class EffectivePlan:
    """A micro-batch and an accumulation for frameworks whose micro-batches are all one size (Lightning, HF).

    Attributes:
        micro: the micro-batch (per device).
        accumulation: gradient accumulation steps.
        exact: ``micro * accumulation`` is the requested effective batch; otherwise it is the smallest
            product above it, and ``note`` says so.
        note: one sentence for a log.
    """

    micro: int
    accumulation: int
    exact: bool
    note: str


def plan_effective_batch(requested: int, safe: int) -> EffectivePlan:
    """Micro-batch x accumulation for an effective batch of ``requested`` when every micro-batch has one size.

    The micro-batch is the largest divisor of ``requested`` that fits (never above ``requested``), so the product
    is exact. When that divisor is under 80 % of the largest size that fits (``min(safe, requested)``; e.g. a
    prime ``requested``), the largest fitting size is used with the smallest accumulation whose product is at
    least ``requested``, and the note says the effective batch grew.

    Example:
        >>> plan_effective_batch(64, 40)
        EffectivePlan(micro=32, accumulation=2, exact=True, note='64 = 32 x 2 (micro-batch x accumulation).')
        >>> plan_effective_batch(97, 40).note
        'No divisor of 97 within 80% of the largest size that fits (40): 40 x 3 = 120, an effective batch of 120.'
    """
    if requested < 1 or safe < 1:
        raise ValueError(f"Batch sizes must be >= 1, got requested={requested}, safe={safe}. Pass positive sizes.")
    largest = min(safe, requested)
    divisor = max(d for d in range(1, largest + 1) if requested % d == 0)
    if divisor >= DIVISOR_FLOOR * largest:
        steps = requested // divisor
        return EffectivePlan(divisor, steps, True, f"{requested} = {divisor} x {steps} (micro-batch x accumulation).")
    steps = math.ceil(requested / largest)
    product = largest * steps
    note = (
        f"No divisor of {requested} within {DIVISOR_FLOOR:.0%} of the largest size that fits ({largest}): "
        f"{largest} x {steps} = {product}, an effective batch of {product}."
    )
    return EffectivePlan(largest, steps, False, note)
