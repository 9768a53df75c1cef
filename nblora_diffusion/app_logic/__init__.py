"""The Gradio app (app/app.py starts it): the page (``ui``, a module per tab), its event handlers
(``handlers``), and the logic they call: uploads, the training settings, queue and stream, generation and
downloads, evaluation."""

from .generation import (
    AdapterInfo,
    PipelineCache,
    find_adapters,
    generate,
    prepare_downloads,
    read_adapter_info,
)
from .handlers import AppHandlers
from .train_settings import make_train_config
from .training_job import TrainEvent, TrainingRun, TrainingSlot
from .uploads import UploadCheck, check_uploads, default_delta, delta_hint, delta_range, save_instance_images

__all__ = [
    "AdapterInfo",
    "AppHandlers",
    "PipelineCache",
    "TrainEvent",
    "TrainingRun",
    "TrainingSlot",
    "UploadCheck",
    "check_uploads",
    "default_delta",
    "delta_hint",
    "delta_range",
    "find_adapters",
    "generate",
    "make_train_config",
    "prepare_downloads",
    "read_adapter_info",
    "save_instance_images",
]
