"""The Generate tab: adapter choice, prompt, the δ' slider, seeds and sampling settings, results and
downloads; and its events (releasing the slider redraws the last images at the new δ')."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..generation import download_guide
from ..handlers import AppHandlers


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
