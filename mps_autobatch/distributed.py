"""Working inside ``torch.distributed`` (a process group started by torchrun): agreeing, not communicating data.

The probe runs in lockstep: rank 0 picks each trial size (`from_rank_zero`), every rank runs it, and
`agree_on_trial` makes its outcome the worst over the ranks, each rank's peak read as a fraction of its own
limit, so an out-of-memory error on one rank is one on all and no rank waits in a collective for another
that failed. A step that runs collectives itself (the trainer's, under DDP) votes with `agree_on_outcome`
before it reduces anything. Ranks that share one host's memory (CPU processes, or several processes on one
Mac) split its default limit. The child-process probe cannot run in lockstep: there each rank searches
alone and `agree_on_probe` takes the smallest answer. Outside a process group every function here is a
no-op that answers for a single process.

Example:
    >>> rank_and_world()
    (0, 1)
    >>> agree_max(7), from_rank_zero(3), rank_zero_decides(lambda: "hit")
    (7, 3, 'hit')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from .accumulation import plan_accumulation
from .devices import MemoryBackend
from .errors import AutobatchError, NoBatchSizeFits
from .oom import is_oom_error
from .results import ProbeResult, Trial

__all__ = [
    "agree_max",
    "agree_on_outcome",
    "agree_on_probe",
    "agree_on_trial",
    "average_gradients",
    "from_rank_zero",
    "init_from_env",
    "is_distributed",
    "local_world_size",
    "rank_and_world",
    "rank_zero_decides",
    "share_failure",
    "sum_over_ranks",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this rank, number of ranks); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def local_world_size() -> int:
    """Ranks on this host (torchrun's LOCAL_WORLD_SIZE); 1 outside a process group."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if is_distributed() else 1


def init_from_env(backend: MemoryBackend) -> tuple[bool, MemoryBackend]:
    """Join the process group torchrun describes in the environment, on ``backend``'s collective library.

    Returns (whether it started the group, the backend of this rank's own device): the caller destroys
    the group when done. Does nothing when WORLD_SIZE is unset or 1, or when the caller already
    initialised a group.

    Raises:
        AutobatchError: several ranks on a device no torch.distributed backend can reduce tensors on (MPS).
    """
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, backend
    if backend.collectives is None:
        raise AutobatchError(
            f"torch.distributed cannot reduce tensors on {backend.name} (gloo and nccl have no support for it): "
            "train with one process there, or on the CPU."
        )
    backend = backend.for_local_rank(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend.collectives)
    return True, backend


def _bookkeeping() -> AbstractContextManager[None]:
    """The ranks' small messages are host bookkeeping, not the step's memory: keep them out of any tracker.

    Under the simulated Mac's tracking (a dispatch mode with a limit) a message's buffers would be booked as
    device memory and could raise its out-of-memory error half-way through a collective, leaving the other
    ranks with a message cut short.
    """
    return _disable_current_modes()


def _device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_int(value: int, op: dist.ReduceOp.RedOpType) -> int:
    if not is_distributed():
        return value
    with _bookkeeping():
        tensor = torch.tensor([value], dtype=torch.int64, device=_device())
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())


def agree_max(value: int) -> int:
    """The largest ``value`` over all ranks, on every rank."""
    return _all_reduce_int(value, dist.ReduceOp.MAX)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (a small CPU tensor) summed over all ranks, on every rank."""
    if not is_distributed():
        return values
    with _bookkeeping():
        total = values.to(_device())
        dist.all_reduce(total)
        return total.cpu()


def rank_zero_decides(decide: Callable[[], T]) -> T:
    """Call ``decide`` on rank 0 only and give its (picklable) answer to every rank.

    Used for cache lookups: one rank reads the file, so all ranks take the same branch.
    """
    if not is_distributed():
        return decide()
    answer = [decide() if dist.get_rank() == 0 else None]
    with _bookkeeping():
        dist.broadcast_object_list(answer, src=0)
    return answer[0]  # type: ignore[return-value]


def from_rank_zero(value: T) -> T:
    """Rank 0's ``value`` (picklable), on every rank: the next trial size in a lockstep probe."""
    if not is_distributed():
        return value
    box = [value]
    with _bookkeeping():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(summary: Any) -> list[Any]:
    summaries: list[Any] = [None] * dist.get_world_size()
    with _bookkeeping():
        dist.all_gather_object(summaries, summary)
    return summaries


def _failure(error: BaseException | None) -> dict[str, Any] | None:
    if error is None:
        return None
    message = str(error).splitlines()[0] if str(error) else ""
    return {"failed": type(error).__name__, "message": message, "oom": is_oom_error(error)}


def _raise_for(error: BaseException | None, failures: list[dict[str, Any] | None], what: str) -> None:
    """Raise on every rank when any failed: this rank's own error, else the first other rank's failure."""
    if error is not None:
        raise error
    for rank, other in enumerate(failures):
        if other is not None and not other["oom"]:
            raise AutobatchError(f"Rank {rank} stopped {what}: {other['failed']}: {other['message']}")
    for rank, other in enumerate(failures):
        if other is not None:
            # MemoryError is out of memory to the probe and the trainer (oom.is_oom_error).
            raise MemoryError(f"Rank {rank} ran out of memory: {other['message']}")


def agree_on_outcome(error: BaseException | None, what: str = "the probe") -> None:
    """Every rank says how its share of some lockstep work ended; if it failed anywhere, it fails everywhere.

    Call it outside the ``except`` block, with the error caught there (or None), so the failed work's
    frames are gone. A rank that failed re-raises its own error; the others raise `MemoryError` (out of
    memory on another rank, so the probe or trainer treats it as one) or `AutobatchError` naming the rank.

    Example:
        >>> agree_on_outcome(None)  # one process, nothing failed: nothing to do
    """
    failures = _gather(_failure(error)) if is_distributed() else [_failure(error)]
    _raise_for(error, failures, what)


def agree_on_trial(trial: Trial, limit_bytes: int, error: BaseException | None = None) -> Trial:
    """The trial as the worst rank saw it, in this rank's own units; raises on every rank if any rank failed.

    Ranks may have different limits, so a peak is compared as a fraction of its rank's limit: the agreed
    peak is the highest fraction times this rank's limit, and every rank then sees the same outcome,
    the same fits, and the same next size. ``error`` is a failure that is not out of memory, which every
    rank raises (this one its own).

    Example:
        >>> t = Trial(8, "ok", 100, 80, 0.1, 80.0, fits_budget=True)
        >>> agree_on_trial(t, limit_bytes=1000) is t
        True
    """
    if not is_distributed():
        if error is not None:
            raise error
        return trial
    mine = {
        "failure": _failure(error),
        "outcome": trial.outcome,
        "peak": None if trial.peak_bytes is None else trial.peak_bytes / limit_bytes,
        "allocated": None if trial.allocated_bytes is None else trial.allocated_bytes / limit_bytes,
        "step_s": trial.step_s,
        "error": trial.error,
        "flushed": trial.flushed,
    }
    everyone = _gather(mine)
    _raise_for(error, [other["failure"] for other in everyone], "the probe")
    worst = next((o for o in everyone if o["outcome"] == "oom"), None) or next(
        (o for o in everyone if o["outcome"] == "over_limit"), None
    )
    if worst is not None and worst["outcome"] == "oom":
        error_text = trial.error if trial.outcome == "oom" else f"another rank: {worst['error']}"
        return Trial(trial.batch_size, "oom", None, None, None, None, fits_budget=False, error=error_text)

    def highest(key: str) -> int | None:
        values = [o[key] for o in everyone if o[key] is not None]
        return int(max(values) * limit_bytes) if values else None

    step_s = max(o["step_s"] for o in everyone if o["step_s"] is not None)
    outcome = "over_limit" if worst is not None else "ok"
    return Trial(
        trial.batch_size,
        outcome,  # type: ignore[arg-type]
        highest("peak"),
        highest("allocated"),
        step_s,
        trial.batch_size / step_s,
        fits_budget=False,  # the search decides fits against its budget
        flushed=any(o["flushed"] for o in everyone),
    )


def share_failure(error: Exception) -> None:
    """Tell the other ranks, waiting in `agree_on_probe`, that this rank's probe raised ``error``.

    The caller re-raises ``error`` afterwards; the other ranks raise an error naming this rank.
    """
    if is_distributed():
        _gather({**(_failure(error) or {}), "no_fit": isinstance(error, NoBatchSizeFits)})


def agree_on_probe(result: ProbeResult) -> ProbeResult:
    """Every rank's probe made one answer: the smallest batch size any rank found, on every rank.

    Each rank calls this once with its own result, or `share_failure` with its error; if any rank
    failed, the others raise an error naming it (`NoBatchSizeFits` when that rank found no size), so
    no rank is left waiting.

    Raises:
        NoBatchSizeFits, AutobatchError: another rank's probe failed.
    """
    if not is_distributed():
        return result
    found = _gather(
        {
            "batch_size": result.batch_size,
            "memory_batch_size": result.memory_batch_size or result.batch_size,
            "max_batch_size": result.max_batch_size,
        }
    )
    for rank, other in enumerate(found):
        if "failed" in other:
            message = f"Rank {rank} stopped the probe: {other['failed']}: {other['message']}"
            if other["no_fit"]:
                raise NoBatchSizeFits(message, trials=result.trials, limit_bytes=result.limit_bytes)
            raise AutobatchError(message)
    sizes = [other["batch_size"] for other in found]
    agreed = min(sizes)
    note = f"{len(sizes)} ranks agreed on the smallest size found ({', '.join(map(str, sizes))}, by rank)."
    return dataclasses.replace(
        result,
        batch_size=agreed,
        memory_batch_size=min(other["memory_batch_size"] for other in found),
        max_batch_size=min(other["max_batch_size"] for other in found),
        accumulation=plan_accumulation(result.requested, agreed) if result.requested is not None else None,
        note=" ".join(filter(None, (result.note, note))),
    )


@torch.no_grad()
def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce of a flat buffer."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
