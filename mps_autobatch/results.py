"""What a probe found: one `Trial` per real training step it ran, and the `ProbeResult` built from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MemoryBreakdown", "Outcome", "ProbeResult", "Trial"]

Outcome = Literal["ok", "oom", "over_limit"]
"""How a trial ended: it ran within the limit, it raised an out-of-memory error, or it ran but its
measured peak went past the limit (CPU and CUDA, where nothing enforces the limit for us)."""


@dataclass(frozen=True)
class Trial:
    """One probe: `steps` real training steps at one batch size.

    Attributes:
        batch_size: samples per step.
        outcome: "ok", "oom" or "over_limit".
        peak_bytes: the peak the decision is made on: driver memory on MPS (what the allocator checks
            against its limit), peak reserved bytes on CUDA, process memory on CPU. None when unknown.
        allocated_bytes: the peak of live tensor memory (what the user's tensors take); the gap to
            ``peak_bytes`` is allocator cache and, on MPS, Metal/MPSGraph allocations.
        step_s: seconds per step (synchronized), None when the trial failed.
        samples_per_s: ``batch_size / step_s``.
        fits_budget: the trial ran, its high point was read, and it is within the budget.
        error: the out-of-memory message, for a failed trial.
        flushed: the allocator released its cache during the step on its own (on MPS driver memory fell: it
            reached its limit or its memory-pressure mark), so the step's high point is above ``peak_bytes``
            and the trial does not fit the budget whatever it read.
    """

    batch_size: int
    outcome: Outcome
    peak_bytes: int | None
    allocated_bytes: int | None
    step_s: float | None
    samples_per_s: float | None
    fits_budget: bool
    error: str | None = None
    flushed: bool = False

    @property
    def ok(self) -> bool:
        """The step ran within the limit."""
        return self.outcome == "ok"


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Where the peak of one step at ``batch_size`` (the recommended size) goes, in bytes.

    The first four are exact, from the model and optimizer; ``activations_bytes`` is the tensor line's bytes
    per sample times the batch; ``other_tensors_bytes`` the rest of the measured tensor peak (backward
    temporaries, a workspace); ``overhead_bytes`` the measured peak minus the tensor peak (the allocator's
    rounding and cache, and on MPS Metal and MPSGraph memory). They add up to ``peak_bytes``.

    Attributes:
        batch_size: the size the step was measured at.
        parameters_bytes, gradients_bytes, optimizer_state_bytes, buffers_bytes: the model's and optimizer's.
        activations_per_sample_bytes: the slope of the tensor peak over the sizes that fit (None with one size).
        activations_bytes: ``activations_per_sample_bytes * batch_size``, at most what the tensor peak leaves.
        other_tensors_bytes: the tensor peak minus all of the above.
        overhead_bytes: the peak minus the tensor peak.
        peak_bytes: the measured peak of the trial at ``batch_size``.
    """

    batch_size: int
    parameters_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    buffers_bytes: int
    activations_per_sample_bytes: int | None
    activations_bytes: int
    other_tensors_bytes: int
    overhead_bytes: int
    peak_bytes: int

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) in the order they add up to the peak.

        Example:
            >>> b = MemoryBreakdown(batch_size=8, parameters_bytes=40, gradients_bytes=40, optimizer_state_bytes=80,
            ...     buffers_bytes=0, activations_per_sample_bytes=10, activations_bytes=80, other_tensors_bytes=5,
            ...     overhead_bytes=55, peak_bytes=300)
            >>> sum(n for _, n in b.rows()) == b.peak_bytes
            True
        """
        return [
            ("parameters", self.parameters_bytes),
            ("gradients", self.gradients_bytes),
            ("optimizer state", self.optimizer_state_bytes),
            ("buffers", self.buffers_bytes),
            (f"activations ({self.batch_size} samples)", self.activations_bytes),
            ("other tensors (temporaries)", self.other_tensors_bytes),
            ("allocator and driver overhead", self.overhead_bytes),
        ]


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    """The answer of `find_safe_batch_size`, with every measurement behind it.

    Attributes:
        batch_size: the recommended size: the largest probed size whose measured peak fits the budget
            (limit minus headroom), rounded down to ``multiple_of``.
        max_batch_size: the largest size verified by a real step within the limit.
        device: the device probed ("mps", "cuda", "cpu", "sim-mps", ...).
        limit_bytes: the memory limit; ``limit_source`` says where it came from.
        budget_bytes: ``limit_bytes * (1 - headroom)``.
        headroom: the fraction of the limit kept free.
        fixed_bytes, per_sample_bytes: the fitted line ``peak = fixed + per_sample * batch_size`` through
            the largest verified sizes (None when there is no memory signal).
        strategy: "measure" (counters guided the search) or "bisect" (crash-driven, see ``note``).
        note: why the strategy was chosen, or anything else worth knowing about the answer.
        steps_per_trial: training steps run in each trial.
        requested: the batch size the caller wanted, if given.
        accumulation: for ``requested``, the (micro-batch, accumulation steps) that reproduce it.
        trials: every trial, in the order they ran.
        elapsed_s: wall time of the whole probe.
        objective: "memory" (``batch_size`` is the largest size that fits) or "throughput" (``batch_size``
            is the smallest size within 5% of the best measured samples/s among sizes that fit).
        memory_batch_size: the memory objective's answer, whatever the objective.
        throughput: for the throughput objective, (batch size, samples/s) of each size timed.
        cached: the answer came from the probe cache (``cache=True``) rather than from trials run now.
        mode: "train" (the answer is the training micro-batch) or "eval" (the evaluation/inference batch).
        example_index: with ``dataset=``, the index of the worst-case sample the batches were built from.
        breakdown: where the peak at the recommended size goes (`MemoryBreakdown`); None when the probe did not
            see the model (a step function without ``model=``) or the size has no measured peak.
    """

    batch_size: int
    max_batch_size: int
    device: str
    limit_bytes: int
    limit_source: str
    budget_bytes: int
    headroom: float
    fixed_bytes: int | None
    per_sample_bytes: int | None
    strategy: Literal["measure", "bisect"]
    note: str
    steps_per_trial: int
    requested: int | None
    accumulation: tuple[int, int] | None
    trials: tuple[Trial, ...]
    elapsed_s: float
    objective: Literal["memory", "throughput"] = "memory"
    memory_batch_size: int | None = None
    throughput: tuple[tuple[int, float], ...] = ()
    cached: bool = False
    mode: Literal["train", "eval"] = "train"
    example_index: int | None = None
    breakdown: MemoryBreakdown | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON.

        Example:
            >>> import json
            >>> from mps_autobatch import ProbeResult
            >>> r = ProbeResult(batch_size=8, max_batch_size=10, device="cpu", limit_bytes=100,
            ...     limit_source="memory_limit", budget_bytes=80, headroom=0.2, fixed_bytes=10, per_sample_bytes=8,
            ...     strategy="measure", note="", steps_per_trial=1, requested=None, accumulation=None, trials=(),
            ...     elapsed_s=0.5)
            >>> json.loads(json.dumps(r.to_dict()))["batch_size"]
            8
        """
        return dataclasses.asdict(self)
