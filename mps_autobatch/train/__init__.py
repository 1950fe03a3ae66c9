"""The bundled trainer: data, training loop and checkpoints behind ``autobatch train``.

``import mps_autobatch`` does not import this package; importing it brings in the trainer's user-level
names below (torch and timm, not the data pipeline, which loads when a run starts).

Example:
    >>> from mps_autobatch.train import TrainConfig
    >>> TrainConfig(dataset="synthetic", model="test_efficientnet").output_dir.as_posix()
    'runs/synthetic-test_efficientnet'
"""

from .config import TrainConfig as TrainConfig
from .engine import TrainingOutOfMemory as TrainingOutOfMemory
from .engine import TrainResult as TrainResult
from .engine import train as train
from .inference import evaluate_checkpoint as evaluate_checkpoint
from .inference import predict as predict

__all__ = ["TrainConfig", "TrainResult", "TrainingOutOfMemory", "evaluate_checkpoint", "predict", "train"]
