"""The Evaluate tab: scores of the last generated images against the subject photos, and its event."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..handlers import AppHandlers

EVAL_HELP = (
    "Scores of the last generated images against the subject photos: DINO and CLIP-I (subject fidelity, "
    "higher = closer), CLIP-T (prompt fidelity; the prompt without the token), LPIPS diversity between the "
    "images and LPIPS distance to the photos. Generate several images, side by side with the base model, "
    "to compare."
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


def wire_evaluate(h: AppHandlers, e: SimpleNamespace, g: SimpleNamespace) -> None:
    g.adapter.change(h.subject_photos, g.adapter, e.photos_dir, api_visibility="private")
    e.evaluate.click(
        h.evaluate,
        [g.adapter, e.photos_dir, g.settings],
        e.scores,
        api_name="evaluate",
        concurrency_id="generate",
    )
