"""The app's page: the three tabs in one Blocks with their events wired to one ``AppHandlers``, queued, and
served (``create_app``, ``launch_app``: what app/app.py and the tests start)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ...metrics import MetricConfig
from .. import uploads
from ..handlers import AppHandlers
from ..train_settings import FormDefaults
from .evaluate_tab import evaluate_tab, wire_evaluate
from .generate_tab import generate_tab, wire_generate
from .train_tab import train_tab, wire_train

TITLE = "NB-LoRA DreamBooth"
MAX_UPLOAD = f"{uploads.MAX_FILE_BYTES // (1024 * 1024)}mb"


def build_app(h: AppHandlers) -> gr.Blocks:
    """The Blocks layout with every event wired to ``h``: one builder per tab, then the wiring per tab."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {TITLE}\nPersonalise `{h.base_model}` with a norm-bounded LoRA: the update's "
            "Schatten-p norm stays ≤ δ by construction."
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train = train_tab(h)
            with gr.Tab("Generate", id="generate"):
                gen = generate_tab(h)
            with gr.Tab("Evaluate", id="evaluate"):
                evaluation = evaluate_tab()
        wire_train(h, train, gen)
        wire_generate(h, demo, gen, train)
        wire_evaluate(h, evaluation, gen)
    return demo


def create_app(
    base_model: str,
    output_dir: str | Path,
    metric_config: MetricConfig | None = None,
    base_model_config: str | Path | None = None,
    form: FormDefaults | None = None,
) -> tuple[gr.Blocks, AppHandlers]:
    """The app for ``base_model`` writing under ``output_dir``, queued (one training at a time).

    ``base_model_config``: a local diffusers folder with the configs of a single-file base model (as
    train_dreambooth.py's --base_model_config), for files whose architecture the shipped configs do not fit.
    """
    handlers = AppHandlers(
        base_model, output_dir, metric_config=metric_config, base_model_config=base_model_config, form=form
    )
    demo = build_app(handlers)
    demo.queue(default_concurrency_limit=1)
    return demo, handlers


def launch_app(
    demo: gr.Blocks,
    output_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    prevent_thread_lock: bool = False,
) -> str:
    """Serve the app; returns its local URL (blocks unless ``prevent_thread_lock``)."""
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD,
        ssr_mode=False,
        allowed_paths=[str(Path(output_dir).resolve())],
        prevent_thread_lock=prevent_thread_lock,
        quiet=True,
    )
    return url
