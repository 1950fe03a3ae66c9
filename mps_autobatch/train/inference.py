"""Use a trained run: evaluate a checkpoint on a split, or name the top classes of image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..devices import get_backend
from ._setup import create_model
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data import eval_loader, load_splits
from .engine import evaluate

__all__ = ["evaluate_checkpoint", "load_trained_model", "predict"]


def load_trained_model(saved: dict[str, Any], device: torch.device) -> nn.Module:
    """The timm model a checkpoint was trained as, with its weights, in eval mode on ``device``."""
    model = create_model(saved["model_name"], len(saved["classes"]), pretrained=False, weights=None)
    model.load_state_dict(saved["model"])
    return model.to(device).eval()


def _run_config(saved: dict[str, Any], data_dir: str | None) -> TrainConfig:
    # The weights file the run started from is not needed any more (and may have moved).
    config = {**saved["config"], "weights": None, "pretrained": False, "resume": False}
    if data_dir is not None:
        config["data_dir"] = data_dir
    return TrainConfig(**config)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 0,
) -> dict[str, Any]:
    """Top-1, top-5 and loss of a checkpoint on its run's validation or test split.

    The split is rebuilt from the run's own settings (dataset, seed, validation fraction), so "val" is
    the same held-out images the run validated on.

    Args:
        checkpoint: a run's last.pt or best.pt.
        split: "val" or "test"; default "test" where the dataset has one (Food-101), else "val".
        data_dir: where the dataset is now, if it moved since training.
        device: "auto", "mps", "cuda", "cuda:N" or "cpu".
        batch_size: images per evaluation batch.
        workers: data-loading processes.

    Returns:
        ``{"checkpoint", "split", "loss", "top1", "top5", "images"}``; accuracies are fractions.

    Raises:
        ValueError: a missing checkpoint, an unknown split, or a split the dataset does not have.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}.")
    if split not in (None, "val", "test"):
        raise ValueError(f"Unknown split {split!r}. Use val or test.")
    saved = load_checkpoint(checkpoint)
    backend = get_backend(device)
    splits = load_splits(_run_config(saved, data_dir), saved["data_config"])
    name = split or ("test" if splits.test is not None else "val")
    dataset = splits.test if name == "test" else splits.val
    if dataset is None:
        raise ValueError(f"The dataset {saved['config']['dataset']!r} has no test split. Pass --split val.")
    pin = backend.pins_memory
    loader = eval_loader(dataset, batch_size, workers=workers, pin_memory=pin, spawn=False)
    metrics = evaluate(load_trained_model(saved, backend.device), loader, device=backend.device)
    return {"checkpoint": str(checkpoint), "split": name, **metrics}


def _read(path: str | Path, transform: Any) -> torch.Tensor:
    from .data import read_image

    try:
        return transform(image=read_image(path))["image"]
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for missing and undecodable files
        raise ValueError(f"Cannot read image {str(path)!r} ({exc}). Pass .jpg, .png or other image files.") from exc


def predict(
    checkpoint: str | Path, images: Sequence[str | Path], *, device: str = "auto", top_k: int = 5
) -> list[dict[str, Any]]:
    """The ``top_k`` most likely class names of each image, with probabilities, from a trained checkpoint.

    Images get the run's evaluation preprocessing (resize, center crop, the model's mean and std).

    Returns:
        One ``{"image": path, "top": [{"class": name, "probability": p}, ...]}`` per image, in order.

    Raises:
        ValueError: a missing checkpoint or an unreadable image.
    """
    from .data import make_eval_transform

    if not images:
        raise ValueError("No images given. Pass one or more image files.")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}.")
    saved = load_checkpoint(checkpoint)
    data = saved["data_config"]
    transform = make_eval_transform(data["image_size"], data["mean"], data["std"], data["crop_pct"])
    batch = torch.stack([_read(path, transform) for path in images])
    backend = get_backend(device)
    model = load_trained_model(saved, backend.device)
    with torch.no_grad():
        probabilities = model(batch.to(backend.device)).float().softmax(dim=1).cpu()
    values, indices = probabilities.topk(min(top_k, probabilities.shape[1]), dim=1)
    classes = saved["classes"]
    return [
        {
            "image": str(path),
            "top": [{"class": classes[i], "probability": p} for p, i in zip(row_p.tolist(), row_i.tolist())],
        }
        for path, row_p, row_i in zip(images, values, indices)
    ]
