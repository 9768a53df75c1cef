"""DreamBooth training with NB-LoRA or PEFT baselines: the library behind train_dreambooth.py."""

from .config import TrainConfig, build_parser
from .loop import train
from .run import TrainCallbacks, TrainingError, TrainResult

__all__ = ["TrainCallbacks", "TrainConfig", "TrainResult", "TrainingError", "build_parser", "train"]
