"""Keep an optimisation batch that does not fit by splitting it into micro-batches (gradient accumulation)."""

from __future__ import annotations

import math

__all__ = ["micro_batch_sizes", "plan_accumulation"]


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
