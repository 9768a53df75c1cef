"""NB-LoRA DreamBooth app: upload a subject, choose p and δ, train, generate with a norm-bound slider.

    python app/app.py [--base_model ID_DIR_OR_FILE] [--base_model_config NAME_OR_DIR] [--host 127.0.0.1]
                      [--port 7860] [--share]

UI wiring only: every handler lives in nblora_diffusion.app_logic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from nblora_diffusion.app_logic import AppHandlers, uploads
from nblora_diffusion.app_logic.generation import download_guide
from nblora_diffusion.app_logic.train_settings import MICRO_DEFAULTS, FormDefaults
from nblora_diffusion.diffusion.single_file import is_single_file
from nblora_diffusion.formats import DEFAULT_BASE_MODEL
from nblora_diffusion.metrics import MetricConfig

TITLE = "NB-LoRA DreamBooth"
EVAL_HELP = (
    "Scores of the last generated images against the subject photos: DINO and CLIP-I (subject fidelity, "
    "higher = closer), CLIP-T (prompt fidelity; the prompt without the token), LPIPS diversity between the "
    "images and LPIPS distance to the photos. Generate several images, side by side with the base model, "
    "to compare."
)
MAX_TRAIN_HANDLERS = 8  # one trains, the others wait in the library's queue with their position shown
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


def train_tab(h: AppHandlers) -> SimpleNamespace:
    """Photos, prompt words, p and δ, the training settings, start / stop / resume, validation previews."""
    d = h.form
    p0, r0 = d.p, d.rank
    with gr.Row():
        with gr.Column(scale=3):
            files = gr.File(
                label=f"Subject photos ({uploads.MIN_IMAGES}–{uploads.MAX_IMAGES}; 5–6 work best)",
                file_count="multiple",
                file_types=["image"],
                elem_id="upload",
            )
            upload_status = gr.Markdown(elem_id="upload-status")
            previews = gr.Gallery(label="Previews", columns=6, height=180, elem_id="previews")
        with gr.Column(scale=2):
            with gr.Row():
                token = gr.Textbox("sks", label="Token", elem_id="token")
                class_noun = gr.Textbox(d.class_noun, label="Class noun", elem_id="class-noun")
            prior = gr.Checkbox(d.prior, label="Prior preservation (generates class images first)")
            p = gr.Radio(
                list(uploads.P_CHOICES),
                value=p0,
                label="Norm p (1 nuclear, 2 Frobenius, ∞ spectral)",
                elem_id="norm-p",
            )
            delta = gr.Number(d.delta or uploads.default_delta(p0, r0), label="Norm bound δ", elem_id="delta")
            delta_hint = gr.Markdown(uploads.delta_hint(p0, r0), elem_id="delta-hint")
            with gr.Row():
                rank = gr.Number(r0, label="Rank", precision=0, minimum=1, elem_id="rank")
                steps = gr.Number(d.steps, label="Steps", precision=0, minimum=1, elem_id="steps")
            with gr.Row():
                lr = gr.Number(d.learning_rate, label="Learning rate", elem_id="lr")
                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                resolution = gr.Number(
                    h.default_resolution(), label="Resolution", precision=0, elem_id="resolution"
                )
            with gr.Accordion("Advanced", open=False):
                val_prompt = gr.Textbox("", label="Validation prompt (default: the instance prompt)")
                val_steps = gr.Number(
                    None,
                    label="Validation every N steps (default steps/4)",
                    precision=0,
                    elem_id="val-steps",
                )
                ckpt_steps = gr.Number(
                    None,
                    label="Checkpoint every N steps (default min(250, steps/2))",
                    precision=0,
                    elem_id="ckpt-steps",
                )
                n_class = gr.Number(d.class_images, label="Class images (prior preservation)", precision=0)
                val_denoise = gr.Number(
                    d.denoise_steps,
                    label="Denoising steps per validation image",
                    precision=0,
                    elem_id="val-denoise",
                )
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    with gr.Row():
        resumable = gr.Dropdown(
            [],
            label="Stopped trainings (resume from the last checkpoint)",
            elem_id="resumable",
            scale=4,
        )
        resume = gr.Button("Resume", scale=1, elem_id="resume")
    train_status = gr.Markdown(elem_id="train-status")
    val_gallery = gr.Gallery(
        label="Validation previews", columns=4, height=260, format="png", elem_id="val-gallery"
    )
    return SimpleNamespace(
        files=files,
        upload_status=upload_status,
        previews=previews,
        token=token,
        class_noun=class_noun,
        prior=prior,
        p=p,
        delta=delta,
        delta_hint=delta_hint,
        rank=rank,
        steps=steps,
        lr=lr,
        seed=seed,
        resolution=resolution,
        val_prompt=val_prompt,
        val_steps=val_steps,
        ckpt_steps=ckpt_steps,
        n_class=n_class,
        val_denoise=val_denoise,
        start=start,
        stop=stop,
        resumable=resumable,
        resume=resume,
        train_status=train_status,
        val_gallery=val_gallery,
    )


def generate_tab(h: AppHandlers) -> SimpleNamespace:
    """Adapter choice, prompt, the δ' slider, seeds and sampling settings, results and downloads."""
    d = h.form
    with gr.Row():
        adapter = gr.Dropdown(
            [],
            label="Adapter (trained here, or type a folder path)",
            allow_custom_value=True,
            scale=4,
            elem_id="adapter",
        )
        refresh = gr.Button("↻ Refresh", scale=1, elem_id="refresh")
    adapter_info = gr.Markdown(elem_id="adapter-info")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(f"a photo of sks {d.class_noun}", label="Prompt", elem_id="prompt")
            negative = gr.Textbox("", label="Negative prompt", elem_id="negative")
            delta_prime = gr.Slider(
                0.0,
                2.0,
                value=1.0,
                step=0.01,
                label="Norm bound δ' (0 = base model, δ = as trained)",
                elem_id="delta-prime",
            )
            ratio = gr.Markdown(elem_id="ratio")
            with gr.Row():
                gen_seed = gr.Number(0, label="Seed", precision=0, elem_id="gen-seed")
                random_seed = gr.Checkbox(False, label="Random seed")
                seed_used = gr.Number(
                    None, label="Seed used", precision=0, interactive=False, elem_id="seed-used"
                )
            with gr.Row():
                n_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="n-images")
                gen_steps = gr.Slider(
                    1, 100, value=d.denoise_steps, step=1, label="Steps", elem_id="gen-steps"
                )
                guidance = gr.Slider(
                    0.0, 15.0, value=d.guidance, step=0.5, label="Guidance", elem_id="guidance"
                )
            side = gr.Checkbox(False, label="Side by side with the base model", elem_id="side")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=3):
            results = gr.Gallery(label="Results", columns=2, format="png", elem_id="results")
            with gr.Accordion("Settings of each image", open=False):
                settings = gr.JSON(elem_id="settings")
    with gr.Accordion("Downloads", open=True):
        prepare = gr.Button(
            "Prepare downloads (native NB-LoRA, diffusers LoRA, kohya LoRA)",
            elem_id="prepare-downloads",
        )
        download_files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="downloads")
        gr.Markdown(download_guide(), elem_id="downloads-guide")
    return SimpleNamespace(
        adapter=adapter,
        refresh=refresh,
        adapter_info=adapter_info,
        prompt=prompt,
        negative=negative,
        delta_prime=delta_prime,
        ratio=ratio,
        gen_seed=gen_seed,
        random_seed=random_seed,
        seed_used=seed_used,
        n_images=n_images,
        gen_steps=gen_steps,
        guidance=guidance,
        side=side,
        generate=generate,
        results=results,
        settings=settings,
        prepare=prepare,
        download_files=download_files,
    )


def evaluate_tab() -> SimpleNamespace:
    """Scores of the last generated images against the subject photos."""
    gr.Markdown(EVAL_HELP)
    photos_dir = gr.Textbox(
        label="Subject photos folder (filled from the adapter's training run)",
        elem_id="photos-dir",
    )
    evaluate = gr.Button("Score the last generated images", variant="primary", elem_id="evaluate")
    scores = gr.Dataframe(label="Scores", interactive=False, elem_id="scores")
    return SimpleNamespace(
        photos_dir=photos_dir,
        evaluate=evaluate,
        scores=scores,
    )


def wire_train(h: AppHandlers, t: SimpleNamespace, g: SimpleNamespace) -> None:
    t.files.change(
        h.check_upload, [t.files, t.resolution], [t.previews, t.upload_status], api_name="check_upload"
    )
    t.p.change(h.p_changed, [t.p, t.rank], [t.delta_hint, t.delta], api_name="delta_hint")
    t.rank.change(h.rank_changed, [t.p, t.rank], t.delta_hint, api_visibility="private")
    train_inputs = [
        t.files,
        t.token,
        t.class_noun,
        t.prior,
        t.p,
        t.delta,
        t.rank,
        t.steps,
        t.lr,
        t.seed,
        t.resolution,
        t.val_prompt,
        t.val_steps,
        t.ckpt_steps,
        t.n_class,
        t.val_denoise,
    ]
    # the library queue runs one training at a time and shows waiting users their place
    train_queue = dict(concurrency_limit=MAX_TRAIN_HANDLERS, concurrency_id="train", show_progress="full")
    train_outputs = [t.train_status, t.val_gallery, g.adapter]
    t.start.click(h.start_training, train_inputs, train_outputs, api_name="train", **train_queue).then(
        h.resumable_choices, None, t.resumable, api_visibility="private"
    )
    t.resume.click(h.resume_training, t.resumable, train_outputs, api_name="resume", **train_queue).then(
        h.resumable_choices, None, t.resumable, api_visibility="private"
    )
    # never queued behind a training: Stop must get through while one runs
    t.stop.click(
        h.stop_training,
        None,
        t.train_status,
        api_name="stop",
        concurrency_limit=None,
        concurrency_id="stop",
    )


def wire_generate(h: AppHandlers, demo: gr.Blocks, g: SimpleNamespace, t: SimpleNamespace) -> None:
    demo.load(h.adapter_choices, None, g.adapter, api_visibility="private")
    demo.load(h.resumable_choices, None, t.resumable, api_visibility="private")
    g.refresh.click(h.adapter_choices, None, g.adapter, api_name="list_adapters")
    g.adapter.change(
        h.adapter_selected, g.adapter, [g.adapter_info, g.delta_prime], api_name="select_adapter"
    )
    g.delta_prime.change(
        h.slider_label,
        [g.delta_prime, g.adapter],
        g.ratio,
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    gen_inputs = [
        g.adapter,
        g.prompt,
        g.negative,
        g.gen_seed,
        g.random_seed,
        g.n_images,
        g.gen_steps,
        g.guidance,
        g.delta_prime,
        g.side,
    ]
    gen_outputs = [g.results, g.settings, g.seed_used]
    g.generate.click(h.generate, gen_inputs, gen_outputs, api_name="generate", concurrency_id="generate")
    # releasing the slider redraws the last images (same seed) at the new δ'
    redraw_inputs = [*gen_inputs[:3], g.seed_used, *gen_inputs[5:]]  # the seed used; no random seed
    g.delta_prime.release(
        h.regenerate_on_slider, redraw_inputs, gen_outputs, api_name="redraw", concurrency_id="generate"
    )
    g.prepare.click(h.downloads, g.adapter, g.download_files, api_name="downloads", concurrency_id="generate")


def wire_evaluate(h: AppHandlers, e: SimpleNamespace, g: SimpleNamespace) -> None:
    g.adapter.change(h.subject_photos, g.adapter, e.photos_dir, api_visibility="private")
    e.evaluate.click(
        h.evaluate,
        [g.adapter, e.photos_dir, g.settings],
        e.scores,
        api_name="evaluate",
        concurrency_id="generate",
    )


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app/app.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base_model",
        default=None,
        help=f"hub id, local diffusers folder or single .safetensors file (default {DEFAULT_BASE_MODEL})",
    )
    parser.add_argument(
        "--base_model_config",
        default=None,
        metavar="NAME_OR_DIR",
        help="configs for a single-file --base_model: sd15, sd21-base, sd21-v, sdxl-base or a diffusers "
        "folder (default: the shipped configs of the architecture its keys show)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the shipped micro SD (32 px micro world, offline) with its metrics and training settings",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--output_dir", default="out/app", help="adapters, uploads and images go here")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    if args.tiny and args.base_model:
        parser.error("give either --tiny or --base_model")
    if args.base_model_config and not (args.base_model and is_single_file(args.base_model)):
        parser.error("--base_model_config applies to a single-file --base_model (.safetensors or .ckpt)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base, metrics, form = args.base_model or DEFAULT_BASE_MODEL, None, None
    if args.tiny:  # the shipped micro SD, judged by the micro world's metrics
        from nblora_diffusion.metrics import MicroWorldConfig
        from nblora_diffusion.microworld import model_path

        base, metrics, form = str(model_path()), MicroWorldConfig(), MICRO_DEFAULTS
    demo, _ = create_app(base, args.output_dir, metrics, base_model_config=args.base_model_config, form=form)
    try:
        print(f"NB-LoRA app on http://{args.host}:{args.port} (base model {base})", flush=True)
        launch_app(demo, args.output_dir, args.host, args.port, args.share)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
