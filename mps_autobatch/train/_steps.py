"""One optimizer update's pieces: micro-batch forward/backward with out-of-memory recovery, the step, evaluation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import distributed
from ..accumulation import micro_batch_sizes
from ..devices import MemoryBackend
from ..errors import AutobatchError
from ..oom import is_oom_error
from .checkpoint import rng_state, set_rng_state

__all__ = [
    "MAX_OOM_RETRIES",
    "TrainingOutOfMemory",
    "evaluate",
    "forward_backward_retrying",
    "micro_loss",
    "optimizer_step",
    "set_lr",
]

MAX_OOM_RETRIES = 3
"""Halvings of the micro-batch tried for one optimisation batch before giving up."""


class TrainingOutOfMemory(AutobatchError):
    """An optimisation batch ran out of memory even after `MAX_OOM_RETRIES` halvings of the micro-batch."""


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def micro_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    device: torch.device,
    amp: str | None,
    channels_last: bool,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(device, amp):
        return loss_fn(model(images), labels.to(device, non_blocking=True))


def _autocast(device: torch.device, amp: str | None) -> AbstractContextManager[Any]:
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    return torch.autocast(device.type, dtype=dtypes[amp]) if amp else nullcontext()


def _forward_backward(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scaler: torch.amp.GradScaler | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    micro: int,
) -> torch.Tensor:
    """Accumulate the gradient of the batch's mean loss; each micro-batch weighted by its share of the batch."""
    total, start, loss_sum = len(images), 0, None
    for size in micro_batch_sizes(total, micro):
        loss = forward(images[start : start + size], labels[start : start + size]) * (size / total)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        # Summed on the device: reading it (a sync point) is left to the log step, once per update.
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        start += size
    assert loss_sum is not None  # a batch has at least one sample
    return loss_sum


def _norm_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
    return [(buffer, buffer.detach().clone()) for m in norms for buffer in m.buffers(recurse=False)]


@torch.no_grad()
def _put_back(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buffer, value in saved:
        buffer.copy_(value)


_OK, _OUT_OF_MEMORY, _FAILED = 0, 1, 2  # one rank's outcome of a pass; the ranks act on the worst


def forward_backward_retrying(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scaler: torch.amp.GradScaler | None,
    model: nn.Module,
    backend: MemoryBackend,
    images: torch.Tensor,
    labels: torch.Tensor,
    micro: int,
    on_oom: Callable[[int, int, str], None],
) -> tuple[torch.Tensor, int]:
    """`_forward_backward`, re-run on the same batch with half the micro-batch after an out-of-memory error.

    A failed pass leaves partial gradients, moved BatchNorm running statistics and advanced RNGs: all three
    are put back before the re-run, so it computes what a run at the smaller micro-batch would have.

    Under DDP (``model`` a `DistributedDataParallel`) the pass accumulates gradients locally (``no_sync``),
    the ranks then vote on its outcome, and only after all succeeded are the gradients averaged. A rank
    that runs out of memory makes every rank halve together; one that fails otherwise stops them all.
    Syncing inside ``backward()`` instead would leave the other ranks waiting in its all-reduce for a
    rank that had already failed.
    """
    stats, rng, first = _norm_stats(model), rng_state(backend.device), micro
    accumulate = model.no_sync if isinstance(model, DistributedDataParallel) else nullcontext
    for retry in range(MAX_OOM_RETRIES + 1):
        message = "another rank ran out of memory"
        try:
            with accumulate():
                loss = _forward_backward(forward, scaler, images, labels, micro)
            outcome = _OK
        except Exception as exc:
            if not is_oom_error(exc):
                distributed.agree_max(_FAILED)  # release the other ranks from their vote, then stop
                raise
            # The allocator's numbers, without MPS's hint to lift the limit (the cap is there on purpose).
            message = str(exc).splitlines()[0].split(" Use PYTORCH_MPS_HIGH_WATERMARK_RATIO")[0]
            outcome = _OUT_OF_MEMORY
        worst = distributed.agree_max(outcome)
        if worst == _FAILED:
            raise AutobatchError("Another rank failed during the training step; its error is in that rank's output.")
        if worst == _OK:
            distributed.average_gradients(model.parameters())
            return loss, micro
        # Outside the except block: the traceback, and the activations its frames pinned, are gone.
        model.zero_grad(set_to_none=True)
        _put_back(stats)
        set_rng_state(rng, backend.device)
        backend.clear_cache()
        if retry == MAX_OOM_RETRIES or micro == 1:
            break
        on_oom(micro, max(micro // 2, 1), message)
        micro = max(micro // 2, 1)
    raise TrainingOutOfMemory(
        f"Out of memory even at micro-batch {micro} (from {first}, after {MAX_OOM_RETRIES} halvings at most): "
        f"{message} Pass a smaller --image-size or model, or a larger --memory-limit."
    )


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()


def _score(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    amp: str | None,
    channels_last: bool,
) -> torch.Tensor:
    """(summed cross-entropy, top-1 hits, top-5 hits) of one batch, on the CPU."""
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(device, amp):
        logits = model(images).float()
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
    return torch.stack([loss, hits[:, 0].sum(), hits.any(dim=1).sum()]).cpu()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    amp: str | None = None,
    channels_last: bool = False,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Mean cross-entropy (no smoothing), top-1 and top-5 accuracy (fractions) over a loader.

    ``batch_size`` splits the loader's batches further: the trainer passes its current micro-batch, so an
    evaluation never needs more memory than the training step that fits.
    """
    was_training = model.training
    model.eval()
    totals, count = torch.zeros(3, dtype=torch.float64), 0
    for images, labels in loader:
        step = batch_size or len(images)
        for start in range(0, len(images), step):
            chunk = slice(start, start + step)
            totals += _score(model, images[chunk], labels[chunk], device, amp, channels_last)
        count += len(labels)
    model.train(was_training)
    # Under torchrun each rank scored its share of the split (`eval_loader`): add them up.
    summed = distributed.sum_over_ranks(torch.cat([totals, torch.tensor([float(count)], dtype=totals.dtype)]))
    loss, top1, top5, images = summed.tolist()
    loss, top1, top5 = (value / max(images, 1) for value in (loss, top1, top5))
    return {"loss": loss, "top1": top1, "top5": top5, "images": int(images)}
