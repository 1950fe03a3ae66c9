"""Working inside ``torch.distributed`` (a process group started by torchrun): agreeing, not communicating data.

Every rank probes its own device; the ranks then agree on the smallest answer, so no rank runs out of
memory while the others wait for it in a collective. A rank whose probe fails joins the agreement with
its failure, so the others stop with it instead of hanging. Ranks that share one host's memory (CPU
processes, or several processes on one Mac) split its default limit. Outside a process group every
function here is a no-op that answers for a single process.

Example:
    >>> rank_and_world()
    (0, 1)
    >>> any_rank(True), agree_min(7), rank_zero_decides(lambda: "hit")
    (True, 7, 'hit')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .accumulation import plan_accumulation
from .errors import AutobatchError, NoBatchSizeFits
from .results import ProbeResult

__all__ = [
    "agree_max",
    "agree_min",
    "agree_on_probe",
    "any_rank",
    "average_gradients",
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


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    Returns True when it started the group (the caller destroys it when done). Does nothing when
    WORLD_SIZE is unset or 1, or when the caller already initialised a group.

    Raises:
        AutobatchError: several ranks on MPS, which no torch.distributed backend can reduce tensors on.
    """
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device_type == "mps":
        raise AutobatchError(
            "torch.distributed cannot reduce tensors on MPS (gloo and nccl have no MPS support): "
            "train with one process on a Mac, or pass --device cpu."
        )
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def _device() -> torch.device:
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce_int(value: int, op: dist.ReduceOp.RedOpType) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    return bool(agree_max(int(flag)))


def agree_max(value: int) -> int:
    """The largest ``value`` over all ranks, on every rank."""
    return _all_reduce_int(value, dist.ReduceOp.MAX)


def agree_min(value: int) -> int:
    """The smallest ``value`` over all ranks, on every rank."""
    return _all_reduce_int(value, dist.ReduceOp.MIN)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` (a small CPU tensor) summed over all ranks, on every rank."""
    if not is_distributed():
        return values
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
    dist.broadcast_object_list(answer, src=0)
    return answer[0]  # type: ignore[return-value]


def _gather(summary: dict[str, Any]) -> list[dict[str, Any]]:
    summaries: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    return summaries


def share_failure(error: Exception) -> None:
    """Tell the other ranks, waiting in `agree_on_probe`, that this rank's probe raised ``error``.

    The caller re-raises ``error`` afterwards; the other ranks raise an error naming this rank.
    """
    if is_distributed():
        text = str(error).splitlines()[0] if str(error) else ""
        _gather({"failed": type(error).__name__, "message": text, "no_fit": isinstance(error, NoBatchSizeFits)})


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
