"""The Train tab: photos, prompt words, p and δ, the training settings, start / stop / resume, validation
previews; and its events (one training at a time, the others queued with their place shown)."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import uploads
from ..handlers import AppHandlers

MAX_TRAIN_HANDLERS = 8  # one trains, the others wait in the library's queue with their position shown


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
