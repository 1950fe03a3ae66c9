"""How a training run is set up: device, model and its data config, optimizer, schedule, batch sizes, memory cap."""

from __future__ import annotations

import math
import random
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..accumulation import plan_accumulation
from ..devices import MemoryBackend
from ..errors import AutobatchError, first_line
from ..results import ProbeResult
from .config import TrainConfig

__all__ = [
    "WeightsUnavailable",
    "choose_batch_sizes",
    "probe_event",
    "create_model",
    "lr_at",
    "make_optimizer",
    "memory_session",
    "model_data_config",
    "resolve_device",
    "seed_everything",
]


class WeightsUnavailable(AutobatchError):
    """The model's pretrained weights could not be fetched or read."""


def model_data_config(model: str | nn.Module) -> dict[str, Any]:
    """timm's preprocessing for a model (mean, std, crop_pct, ...), from the model or its name.

    A name is instantiated on the meta device: no memory, no weights, just the config it carries.

    Example:
        >>> model_data_config("test_efficientnet")["crop_pct"]
        0.95
    """
    import timm

    if isinstance(model, str):
        with torch.device("meta"):
            model = timm.create_model(model, pretrained=False)
    return dict(timm.data.resolve_model_data_config(model))


def create_model(name: str, num_classes: int, *, pretrained: bool, weights: str | None) -> nn.Module:
    """A timm model with a ``num_classes`` head, from pretrained weights (the hub's, or ``weights``) or not.

    Raises:
        WeightsUnavailable: pretrained weights could not be fetched (offline, unknown tag) or read.
    """
    import timm
    from safetensors import SafetensorError

    overlay: dict[str, Any] = {"pretrained_cfg_overlay": {"file": str(Path(weights).expanduser())}} if weights else {}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **overlay)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        # timm reports hub failures as FileNotFoundError/ValueError/OSError (REFERENCE.md F), a bad file as
        # RuntimeError (torch.load) or SafetensorError; an unknown name is a RuntimeError too, not about weights.
        if not pretrained or not timm.is_model(name):
            raise
        reason = first_line(exc)
        source = f"from {weights!r}" if weights else "from the Hugging Face hub"
        raise WeightsUnavailable(
            f"Could not load pretrained weights for {name!r} {source} ({reason}). "
            "Pass --weights FILE with a local copy, or --no-pretrained to train from scratch."
        ) from exc


def make_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9, Nesterov); biases and normalisation weights get no weight decay, as in timm."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"Unknown optimizer {name!r}. Use adamw or sgd.")


def lr_at(update: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` updates to ``peak``, then cosine decay to zero at ``total`` updates.

    Example:
        >>> [round(lr_at(u, peak=1.0, warmup=2, total=6), 3) for u in range(6)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    if update < warmup:
        return peak * (update + 1) / warmup
    progress = (update - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def probe_event(probe: ProbeResult, name: str = "probe") -> dict[str, Any]:
    """A probe's answer as a run's event: the size, the largest verified, the limit, and its trial's peak."""
    size = probe.batch_size
    event = {"event": name, "batch_size": size, "max_batch_size": probe.max_batch_size}
    event |= {"limit_bytes": probe.limit_bytes, "device": probe.device, "strategy": probe.strategy}
    event |= {"cached": probe.cached}
    event |= {"peak_bytes": next((t.peak_bytes for t in probe.trials if t.batch_size == size), None)}
    return event


def choose_batch_sizes(
    config: TrainConfig, probe: ProbeResult | None, n_train: int
) -> tuple[int, int, dict[str, Any] | None]:
    """(micro-batch, effective batch, the probe's event or None) for a new run."""
    event = None
    if probe is not None:
        safe = probe.batch_size
        event = probe_event(probe)
    else:
        assert config.batch_size != "auto"
        safe = config.batch_size
    effective = config.effective_batch_size or (min(safe, n_train) if event else safe)
    if effective > n_train:
        raise ValueError(
            f"An optimisation batch of {effective} is more than the {n_train} training images. "
            "Pass a smaller --batch-size or --effective-batch-size."
        )
    micro, _ = plan_accumulation(effective, safe)
    return micro, effective, event


def memory_session(backend: MemoryBackend, memory_limit: int | None) -> AbstractContextManager[Any]:
    # MPS's default cap is above the Mac's RAM, so an oversized step would swap instead of raising
    # (REFERENCE.md B): keep the probe's cap set while training. Elsewhere the allocator already raises.
    limit = backend.limit(memory_limit).bytes
    backend.check_can_run(limit)
    return backend.session(limit) if backend.keeps_cap_while_training else nullcontext()


def resolve_device(config: TrainConfig) -> str | MemoryBackend:
    if config.simulate is None:
        return config.device
    from ..simulate import simulated_backend

    return simulated_backend(config.simulate)
