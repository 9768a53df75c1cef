"""Event handlers of the Gradio app (``app_logic.ui`` wires them to components; no math here).

Library errors (ValueError) become ``gr.Error`` with the same one-line message (``page_errors``), so the
page shows the message and never a stack trace. A training's queue place and progress lines come from
``train_stream``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from .._deprecated import deprecated_names
from ..formats import DEFAULT_BASE_MODEL as _DEFAULT_BASE_MODEL
from . import evaluation, generation, uploads
from .page_errors import shown_in_page, user_error
from .train_settings import (
    FormDefaults,
    make_train_config,
    mixed_precision,
    native_resolution,
    prompts_for,
    resumable_config,
    resumable_runs,
)
from .train_stream import stream_training
from .training_job import TrainingSlot

_PROGRESS = gr.Progress()  # Gradio finds the progress argument by this default and passes a fresh tracker


def _owner(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


class AppHandlers:
    """State shared by every user of one app: the training slot, the pipeline cache, the output folders."""

    def __init__(
        self,
        base_model: str | None,
        output_root: str | os.PathLike,
        train_fn: Any = None,
        device: str | None = None,
        metric_config: Any = None,
        base_model_config: str | os.PathLike | None = None,
        form: FormDefaults | None = None,
    ) -> None:
        self.base_model = str(base_model) if base_model else None
        self.form = form or FormDefaults()
        self.base_model_config = str(base_model_config) if base_model_config else None
        self.root = Path(output_root).resolve()
        self.adapters_dir = self.root / "adapters"
        self.slot = TrainingSlot(train_fn)
        self.cache = generation.PipelineCache(device=device, base_model_config=self.base_model_config)
        self.evaluator = evaluation.Evaluator(metric_config)

    # -- Train tab ----------------------------------------------------------------------------------
    def default_resolution(self) -> int:
        return native_resolution(self.base_model)

    def check_upload(self, files: Any, resolution: Any = None) -> tuple[list, str]:
        """Previews and a status line for the uploaded photos; gr.Error for unusable uploads."""
        paths = uploads.file_paths(files)
        if not paths:
            return [], ""
        try:
            res = int(resolution) if resolution else None
            check = uploads.check_uploads(paths, res)
        except ValueError as e:
            raise user_error(str(e)) from None
        for w in check.warnings:
            gr.Warning(w)
        lines = [f"{len(check.images)} photos ready."] + [f"Warning: {w}" for w in check.warnings]
        return [str(p) for p in check.images], "\n\n".join(lines)

    def p_changed(self, p: str, rank: Any) -> tuple[str, float]:
        """Hint for δ and a sensible default for the new p."""
        r = self._rank(rank)
        return uploads.delta_hint(p, r), uploads.default_delta(p, r)

    def rank_changed(self, p: str, rank: Any) -> str:
        return uploads.delta_hint(p, self._rank(rank))

    @staticmethod
    def _rank(rank: Any) -> int:
        try:
            r = int(float(rank))
        except (TypeError, ValueError):
            return 4
        return max(r, 1)

    def start_training(
        self,
        files: Any,
        token: str,
        class_noun: str,
        prior_preservation: bool,
        p: str,
        delta: float,
        rank: float,
        steps: float,
        learning_rate: float,
        seed: float,
        resolution: float,
        validation_prompt: str = "",
        validation_steps: float | None = None,
        checkpointing_steps: float | None = None,
        num_class_images: float = 100,
        validation_inference_steps: float = 25,
        request: gr.Request | None = None,
        progress: gr.Progress = _PROGRESS,
    ) -> Iterator[tuple[str, list, Any]]:
        """Train with ``nblora_diffusion.training.train``; yields (status, validation gallery, adapters)."""
        if not self.base_model:
            raise user_error("no base model: start the app with --base_model")
        try:
            check = uploads.check_uploads(uploads.file_paths(files), int(resolution) if resolution else None)
            prompts_for(token, class_noun)
        except (ValueError, TypeError) as e:
            raise user_error(str(e)) from None
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uploads.slug(token)}-{uploads.slug(class_noun)}"
        out_dir = self.adapters_dir / name
        instance_dir = self.root / "uploads" / name
        try:
            uploads.save_instance_images(check.images, instance_dir)
            config = make_train_config(
                base_model=self.base_model,
                base_model_config=self.base_model_config,
                instance_data_dir=instance_dir,
                output_dir=out_dir,
                token=token,
                class_noun=class_noun,
                p=p,
                delta=delta,
                rank=rank,
                max_train_steps=steps,
                learning_rate=learning_rate,
                seed=seed,
                resolution=resolution,
                with_prior_preservation=prior_preservation,
                class_data_dir=self.root / "class_images" / uploads.slug(class_noun),
                num_class_images=num_class_images,
                validation_prompt=(validation_prompt or "").strip() or None,
                validation_steps=validation_steps or None,
                checkpointing_steps=checkpointing_steps or None,
                validation_inference_steps=validation_inference_steps,
                export_kohya=True,  # all three download formats exist as soon as training ends
                mixed_precision=mixed_precision(),
            )
        except (ValueError, TypeError) as e:
            shutil.rmtree(instance_dir, ignore_errors=True)
            raise user_error(str(e)) from None

        yield from self._train(config, _owner(request), progress, uploaded=instance_dir)

    def resume_training(
        self, folder: str | None, request: gr.Request | None = None, progress: gr.Progress = _PROGRESS
    ) -> Iterator[tuple[str, list, Any]]:
        """Continue a stopped training from its latest checkpoint; yields what ``start_training`` does."""
        if not folder:
            raise user_error("choose a stopped training to resume")
        try:
            config = resumable_config(folder)
        except (ValueError, OSError) as e:
            raise user_error(str(e)) from None
        yield from self._train(config, _owner(request), progress)

    def resumable_choices(self) -> Any:
        """Dropdown update listing this app's stopped trainings (newest first)."""
        runs = resumable_runs(self.adapters_dir)
        return gr.update(choices=[(d.name, str(d)) for d in runs], value=str(runs[0]) if runs else None)

    def _train(
        self, config: Any, owner: str | None, progress: Any, uploaded: Path | None = None
    ) -> Iterator[tuple[str, list, Any]]:
        """The run of ``config`` in the training slot as (status, validation gallery, adapters) lines, the
        last one listing the new adapter; ``uploaded``: the photos copied for a new run (stream_training)."""
        yield from stream_training(
            self.slot,
            config,
            owner=owner,
            progress=progress,
            adapters_after=lambda folder: self.adapter_choices(select=str(folder)),
            uploaded=uploaded,
        )

    def stop_training(self, request: gr.Request | None = None) -> str:
        what = self.slot.stop(owner=_owner(request))
        if what == "stopping":
            return "Stopping after the current step (a checkpoint is saved)…"
        if what == "cancelled":
            return "Cancelled the waiting training."
        gr.Info("No training of yours is running.")
        return ""

    # -- Generate tab -------------------------------------------------------------------------------
    def adapter_choices(self, select: str | None = None) -> Any:
        """Dropdown update listing this app's adapters (newest first), selecting ``select`` if given."""
        choices = []
        for folder in generation.find_adapters(self.adapters_dir):
            try:
                choices.append((generation.read_adapter_info(folder).label, str(folder)))
            except ValueError:
                continue
        if select is None:
            return gr.update(choices=choices)
        return gr.update(choices=choices, value=select)

    def adapter_selected(self, folder: str | None) -> tuple[str, Any]:
        """Info line and a δ' slider from 0 to 2δ (at δ) for the chosen adapter."""
        if not folder:
            return "Pick an adapter trained here, or type the path of an adapter folder.", gr.update()
        try:
            info = generation.read_adapter_info(folder)
        except ValueError as e:
            gr.Warning(str(e))
            return f"Warning: {e}", gr.update()
        token = f", token `{info.token}`" if info.token else ""
        text = f"**{info.folder.name}**: base `{info.base_model}`{token}, trained bound δ = {info.delta:g}."
        return text, gr.update(
            minimum=0.0,
            maximum=round(2 * info.delta, 6),
            value=info.delta,
            step=round(info.delta / 50, 6) or 0.01,
        )

    def generate(
        self,
        folder: str | None,
        prompt: str,
        negative_prompt: str,
        seed: float,
        random_seed: bool,
        num_images: float,
        steps: float,
        guidance: float,
        delta_prime: float,
        side_by_side: bool,
    ) -> tuple[list, list, int]:
        """Gallery items (saved PNG, caption), the settings of every image, and the seed used."""
        if not folder:
            raise user_error("pick an adapter first")
        with shown_in_page("generation"):
            seed = generation.resolve_seed(seed, bool(random_seed))
            results = generation.generate(
                self.cache,
                folder,
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                num_images=int(num_images),
                steps=int(steps),
                guidance=float(guidance),
                delta_prime=None if delta_prime is None else float(delta_prime),
                side_by_side=bool(side_by_side),
                fallback_base=self.base_model,
            )
            paths = generation.save_images(results, self.root / "generations")
        settings = [{**s, "file": str(p)} for (_, s), p in zip(results, paths, strict=True)]
        return [(str(p), generation.caption(s)) for p, s in zip(paths, settings, strict=True)], settings, seed

    def regenerate_on_slider(
        self,
        folder: str | None,
        prompt: str,
        negative_prompt: str,
        last_seed: Any,
        num_images: float,
        steps: float,
        guidance: float,
        delta_prime: float,
        side_by_side: bool,
    ) -> tuple[Any, Any, Any]:
        """Slider release: redraw the last images (same seed) at the new δ'; no-op before a first Generate."""
        if not folder or not (prompt or "").strip() or last_seed is None or last_seed == "":
            return gr.update(), gr.update(), gr.update()
        return self.generate(
            folder,
            prompt,
            negative_prompt,
            seed=last_seed,
            random_seed=False,
            num_images=num_images,
            steps=steps,
            guidance=guidance,
            delta_prime=delta_prime,
            side_by_side=side_by_side,
        )

    def downloads(self, folder: str | None) -> list[str]:
        if not folder:
            raise user_error("pick an adapter first")
        with shown_in_page("export"):
            files = generation.prepare_downloads(self.cache, folder, self.root / "downloads", self.base_model)
        return [str(f) for f in files]

    def slider_label(self, delta_prime: float, folder: str | None) -> str:
        try:
            delta = generation.read_adapter_info(folder).delta if folder else None
        except ValueError:
            delta = None
        if not delta or delta_prime is None or not math.isfinite(float(delta_prime)):
            return ""
        return f"δ'/δ = {float(delta_prime) / delta:.2f}" + (
            " (base model)" if float(delta_prime) == 0 else ""
        )

    # -- Evaluate tab -------------------------------------------------------------------------------
    def subject_photos(self, folder: str | None) -> str:
        """The training photos folder of the chosen adapter, when known (prefills the Evaluate tab)."""
        return evaluation.subject_photos(folder) or "" if folder else ""

    def evaluate(self, folder: str | None, photos: str, settings: Any) -> Any:
        """A table of DINO, CLIP-I, CLIP-T and LPIPS scores per group (base / each δ') of the last images."""
        import pandas as pd

        if not folder:
            raise user_error("pick an adapter first")
        settings = settings if isinstance(settings, list) else []
        with shown_in_page("evaluation"):
            rows = self.evaluator.score(folder, (photos or "").strip() or None, settings)
        return pd.DataFrame(rows, columns=self.evaluator.columns)


__getattr__ = deprecated_names(
    __name__,
    {"DEFAULT_BASE_MODEL": ("nblora_diffusion.formats.DEFAULT_BASE_MODEL", lambda: _DEFAULT_BASE_MODEL)},
)
