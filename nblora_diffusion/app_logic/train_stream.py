"""A training run as the Train tab shows it: the place in the queue while it waits for the training slot,
then a status line per step (validation images, checkpoints), then one line saying how it ended."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from .page_errors import user_error
from .training_job import SlotBusy, TrainingSlot, describe_step, format_duration


def stream_training(
    slot: TrainingSlot,
    config: Any,
    *,
    owner: str | None,
    progress: Any,
    adapters_after: Callable[[Path], Any],
    uploaded: Path | None = None,
) -> Iterator[tuple[str, list, Any]]:
    """Wait for ``slot``, run ``config`` there and yield (status, validation gallery, adapters).

    ``adapters`` leaves the adapter list as it is (``gr.update()``) until the last line of a run that wrote
    its adapter (finished or stopped), which brings ``adapters_after(output folder)``. ``uploaded``: the
    photos copied for a new run, removed if it ends before writing anything. Bad settings and a failed run
    raise ``gr.Error``.
    """
    out_dir = Path(config.output_dir)
    gallery: list[tuple[Any, str]] = []
    adapters = gr.update()
    run = None
    ticket = slot.enqueue(owner)
    try:
        while run is None:
            if ticket.cancelled:
                if uploaded is not None:
                    shutil.rmtree(uploaded, ignore_errors=True)
                yield "Cancelled before it started.", gallery, adapters
                return
            try:
                run = slot.start(config, wait_s=1.0, ticket=ticket)
            except SlotBusy:
                ahead = slot.ahead_of(ticket)
                yield f"Waiting in the training queue: {ahead} training(s) ahead of yours.", gallery, adapters
            except ValueError as e:
                if not ticket.cancelled:
                    raise user_error(str(e)) from None
    finally:
        slot.leave(ticket)  # closed page or error while waiting: give the place up
    progress(0, desc="starting")
    verb = "resumed from the latest checkpoint" if config.resume_from_checkpoint else "started"
    yield f"Training {verb} ({config.max_train_steps} steps) → `{out_dir}`", gallery, adapters
    status = "starting…"
    for event in run.events():
        if event is None:
            continue
        if event.kind == "step":
            status = describe_step(event)
            progress((event.step, event.max_steps), desc=status)
        elif event.kind == "validation":
            gallery = gallery + [(img, f"step {event.step}") for img in event.images]
        elif event.kind == "checkpoint":
            status = f"{status} · checkpoint saved at step {event.step}"
        elif event.kind == "error":
            if uploaded is not None and not out_dir.exists():  # failed before writing anything
                shutil.rmtree(uploaded, ignore_errors=True)
            raise user_error(event.error or "training failed")
        elif event.kind == "done":
            break
        prefix = "Stopping… " if run.stop_requested else ""
        yield prefix + status, gallery, adapters
    result = run.result
    step = getattr(result, "final_step", None)
    took = format_duration(run.last_step.elapsed_s if run.last_step else None)
    if getattr(result, "stopped", False):
        done = (
            f"Stopped at step {step}; the last checkpoint is `{run.last_checkpoint}` "
            f"and the adapter `{out_dir}`. Resume it below."
        )
    else:
        done = f"Finished {step} steps in {took}; adapter saved to `{out_dir}`."
    yield done, gallery, adapters_after(out_dir)
