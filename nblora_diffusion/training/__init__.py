"""DreamBooth training with NB-LoRA or PEFT baselines: the library behind train_dreambooth.py."""

from .child_process import TrainingProcessError, train_in_child_process
from .config import TrainConfig, build_parser
from .loop import train
from .run import TrainCallbacks, TrainingError, TrainResult

__all__ = [
    "TrainCallbacks",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingProcessError",
    "build_parser",
    "train",
    "train_in_child_process",
]
