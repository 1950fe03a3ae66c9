"""One optimizer update's pieces: micro-batch forward/backward with out-of-memory recovery, the step, evaluation."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import distributed
from ..accumulation import micro_batch_sizes
from ..devices import MemoryBackend
from ..errors import AutobatchError, mark_failed_step
from ..oom import is_oom_error
from ..step import Rewind, TrainingStep, autocast

__all__ = [
    "MAX_OOM_RETRIES",
    "TrainingOutOfMemory",
    "evaluate",
    "forward_backward_retrying",
    "one_update",
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


def _forward_backward(step: TrainingStep, images: torch.Tensor, labels: torch.Tensor, micro: int) -> torch.Tensor:
    """Accumulate the gradient of the batch's mean loss; each micro-batch weighted by its share of the batch."""
    total, start, loss_sum = len(images), 0, None
    for size in micro_batch_sizes(total, micro):
        loss = step.loss(images[start : start + size], labels[start : start + size]) * (size / total)
        step.backward(loss)
        # Summed on the device: reading it (a sync point) is left to the log step, once per update.
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        start += size
    assert loss_sum is not None  # a batch has at least one sample
    return loss_sum


def _agreed_forward_backward(
    step: TrainingStep, images: torch.Tensor, labels: torch.Tensor, micro: int
) -> torch.Tensor:
    """`_forward_backward` on every rank, or an error on every rank; gradients averaged once all succeeded.

    Under DDP (``step.model`` a `DistributedDataParallel`) the pass accumulates gradients locally
    (``no_sync``) and the ranks vote on its outcome before any gradient is reduced: syncing inside
    ``backward()`` would leave the other ranks waiting in its all-reduce for a rank that had already failed.
    """
    accumulate = step.model.no_sync if isinstance(step.model, DistributedDataParallel) else nullcontext
    error, loss = None, None
    try:
        with accumulate():
            loss = _forward_backward(step, images, labels, micro)
    except Exception as exc:
        traceback.clear_frames(exc.__traceback__)  # its frames pin the failed pass's activations
        error = exc
    distributed.agree_on_outcome(error, "the training step")
    distributed.average_gradients(step.model.parameters())
    assert loss is not None
    return loss


def one_update(step: TrainingStep, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One whole optimizer update on one batch, exactly as the loop runs it at a micro-batch of the whole batch.

    This is the step ``--batch-size auto`` probes: the trainer's model (channels_last, the DDP wrapper), its
    loss, optimizer, scaler and gradient averaging, on every rank in lockstep.
    """
    _agreed_forward_backward(step, images, labels, len(images))
    step.update()


def forward_backward_retrying(
    step: TrainingStep,
    backend: MemoryBackend,
    images: torch.Tensor,
    labels: torch.Tensor,
    micro: int,
    on_oom: Callable[[int, int, str], None],
) -> tuple[torch.Tensor, int]:
    """`_agreed_forward_backward`, re-run on the same batch with half the micro-batch after an out-of-memory error.

    A failed pass leaves partial gradients, moved BatchNorm running statistics and advanced RNGs: all three
    are put back before the re-run, so it computes what a run at the smaller micro-batch would have. A rank
    that runs out of memory makes every rank halve together; one that fails otherwise stops them all.
    """
    rewind, first = Rewind(step.model, backend.device), micro
    for retry in range(MAX_OOM_RETRIES + 1):
        try:
            return _agreed_forward_backward(step, images, labels, micro), micro
        except Exception as exc:
            if not is_oom_error(exc):
                if not isinstance(exc, AutobatchError):  # another rank's failure is already said as such
                    mark_failed_step(exc, f"at micro-batch {micro}")
                raise
            # The allocator's numbers, without MPS's hint to lift the limit (the cap is there on purpose).
            message = str(exc).splitlines()[0].split(" Use PYTORCH_MPS_HIGH_WATERMARK_RATIO")[0]
        # Outside the except block: the traceback, and the activations its frames pinned, are gone.
        step.model.zero_grad(set_to_none=True)
        rewind.restore()
        backend.clear_cache()
        if retry == MAX_OOM_RETRIES or micro == 1:
            break
        on_oom(micro, max(micro // 2, 1), message)
        micro = max(micro // 2, 1)
    raise TrainingOutOfMemory(
        f"Out of memory even at micro-batch {micro} (from {first}, after {MAX_OOM_RETRIES} halvings at most): "
        f"{message} Pass a smaller --image-size or model, or a larger --memory-limit."
    )


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
    with autocast(device, amp):
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
