"""The bundled trainer: data, training loop and checkpoints behind ``autobatch train``.

The user-level names below load on first use (PEP 562), so importing this package, or the CLI that
registers its commands, stays light until a run starts.

Example:
    >>> from mps_autobatch.train import TrainConfig
    >>> TrainConfig(dataset="synthetic", model="test_efficientnet").output_dir.as_posix()
    'runs/synthetic-test_efficientnet'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

if TYPE_CHECKING:
    from .checkpoint import TrainingInterrupted as TrainingInterrupted
    from .config import TrainConfig as TrainConfig
    from .engine import TrainingOutOfMemory as TrainingOutOfMemory
    from .engine import TrainResult as TrainResult
    from .engine import train as train
    from .inference import evaluate_checkpoint as evaluate_checkpoint
    from .inference import predict as predict

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "TrainingOutOfMemory",
    "evaluate_checkpoint",
    "predict",
    "train",
]

# Where each public name lives.
_HOMES = {
    "TrainConfig": "config",
    "TrainResult": "engine",
    "TrainingInterrupted": "checkpoint",
    "TrainingOutOfMemory": "engine",
    "train": "engine",
    "evaluate_checkpoint": "inference",
    "predict": "inference",
}


__getattr__ = lazy_attributes(__name__, _HOMES)
