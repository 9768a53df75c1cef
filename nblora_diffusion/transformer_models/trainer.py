"""transformers ``Trainer`` integration: adapter-only files next to every checkpoint."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from .io import save_model_adapter


class NBLoRACheckpointCallback(TrainerCallback):
    """Write the adapter folder (``save_model_adapter`` layout) into each ``checkpoint-N`` the Trainer saves,
    and into ``output_dir`` at the end of training, so every checkpoint loads with ``load_model_adapter``."""

    def __init__(self, base_model: str | None = None) -> None:
        self.base_model = base_model

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_model_adapter(model, folder, base_model=self.base_model, global_step=state.global_step)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        save_model_adapter(model, args.output_dir, base_model=self.base_model, global_step=state.global_step)
        return control
