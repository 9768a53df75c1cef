"""train(config, callbacks, should_stop): DreamBooth training as a list of named steps."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import diffusion
from . import checkpoint as ckpt
from .caching import LatentCache, VAELatents, check_latent_cache, offload, onloaded
from .config import TrainConfig
from .logs import RunLog, plot_norms
from .losses import dreambooth_loss
from .methods import TEXT_COMPONENTS, AdapterSetup, add_adapters
from .norms import layer_norms
from .outputs import write_adapter
from .preservation import scale_weight_norms
from .run import Parts, Run, TrainCallbacks, TrainingError, TrainResult
from .sampling import generate
from .setup import (
    check_inputs,
    class_photos,
    load_base,
    make_accelerator,
    make_dataloader,
    make_optimizer,
    prepare_output,
    tf32_matmuls,
    write_run_config,
)
from .text import PromptEncoder
from .validation_metrics import ValidationMetrics

log = logging.getLogger(__name__)

OOM_HINT = (
    "reduce memory with --gradient_checkpointing, --mixed_precision fp16 (GPU), --train_batch_size 1, "
    "--cache_latents, --cache_text_embeddings, --optimizer adamw8bit, or a smaller --resolution / --rank "
    "(--estimate_memory tells the peak without a GPU)"
)


# -- steps inside the loop ----------------------------------------------------------------------------
def save_checkpoint(run: Run, callbacks: TrainCallbacks) -> Path:
    """checkpoint-N/: accelerate state (optimizer, scheduler, RNG) + exact tensors + the adapter alone."""
    acc, out, step = run.accelerator, run.output_dir, run.global_step
    tmp = ckpt.begin(out, step) if acc.is_main_process else out / f".checkpoint-{step}.tmp"
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))  # every process writes its own RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            run_state = {
                "global_step": step,
                "data_seed": run.data_seed,
                "adapter": run.config.adapter,
                "rank": run.config.rank,
                "norm_p": run.config.norm_p,
            }
            ckpt.write_state(tmp, run.setup.state(), run_state)
            write_adapter(run.pipe, run.setup, tmp, run.config, step, final=False)
            ckpt.commit(tmp, out, step)
            ckpt.prune(out, run.config.checkpoints_total_limit)
    except BaseException:
        if acc.is_main_process:
            ckpt.abort(tmp)
        raise
    acc.wait_for_everyone()
    path = out / f"checkpoint-{step}"
    run.last_checkpoint = path
    if callbacks.on_checkpoint and acc.is_main_process:
        callbacks.on_checkpoint(step, path)
    return path


def validate(run: Run, runlog: RunLog, callbacks: TrainCallbacks) -> None:
    cfg = run.config
    if not cfg.validation_prompt or not run.accelerator.is_main_process:
        return
    with onloaded(run.offloaded, run.accelerator.device):
        images = generate(
            run.pipe,
            cfg.validation_prompt,
            num=cfg.num_validation_images,
            steps=cfg.validation_inference_steps,
            resolution=run.resolution,
            seed=cfg.seed or 0,
            sdxl=run.sdxl,
        )
        if run.metrics is not None:
            run.metrics.evaluate(run.global_step, run.pipe, images, run.accelerator)
    runlog.images(run.global_step, images)
    if callbacks.on_validation:
        callbacks.on_validation(run.global_step, images)


def save_final(run: Run) -> None:
    if run.accelerator.is_main_process:
        write_adapter(run.pipe, run.setup, run.output_dir, run.config, run.global_step, final=True)
        plot_norms(run.output_dir)
    run.accelerator.wait_for_everyone()


# -- the run --------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    callbacks: TrainCallbacks | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train an adapter as ``config`` says; see train_dreambooth.py --help for every option.

    Bad input raises ValueError with a one-line message before anything is written; a non-finite
    loss or running out of memory raises TrainingError (a ValueError) and keeps the last checkpoint.
    When ``should_stop()`` turns true the run saves a checkpoint and the adapter and returns with
    ``stopped=True``.
    """
    from accelerate.utils import broadcast_object_list, set_seed

    callbacks = callbacks or TrainCallbacks()
    out, resume, photos = check_inputs(config)
    run_state = ckpt.read_state(resume)[1] if resume else {}
    if run_state and run_state.get("adapter") != config.adapter:
        raise ValueError(
            f"checkpoint {resume} was trained with --adapter {run_state.get('adapter')}, not {config.adapter}"
        )
    accelerator = make_accelerator(config, out)
    if config.seed is not None:
        set_seed(config.seed)
    data_seed = run_state.get(
        "data_seed", config.seed if config.seed is not None else random.randrange(2**31)
    )
    if accelerator.num_processes > 1:  # one seed for all processes: the data shards and Bernoulli draws agree
        data_seed = broadcast_object_list([data_seed])[0]
    run = None
    try:
        with tf32_matmuls(config.allow_tf32):  # a process-wide flag: restored when the run ends or raises
            pipe, weight_dtype, resolution = load_base(config, accelerator)
            warn_small(photos, resolution, config)
            sdxl = diffusion.is_sdxl(pipe)
            classes = class_photos(config, pipe, resolution, sdxl, data_seed, accelerator)
            if config.cache_latents:
                check_latent_cache(photos, classes, resolution, config.center_crop)
            main = accelerator.is_main_process  # the base model's metric row, before the adapters exist
            metrics = ValidationMetrics.prepare(config, pipe, out, photos, resolution, sdxl) if main else None
            setup = add_adapters(pipe, config)
            prepare_output(
                config, out, accelerator
            )  # the first write to --output_dir: every check has passed
            write_run_config(config, out, resume, accelerator)
            run = Run(
                config=config,
                output_dir=out,
                accelerator=accelerator,
                pipe=pipe,
                setup=setup,
                resolution=resolution,
                sdxl=sdxl,
                weight_dtype=weight_dtype,
                data_seed=data_seed,
                metrics=metrics,
            )
            parts = build(run, photos, classes, resume)
            return fit(run, parts, callbacks, should_stop)
    except torch.OutOfMemoryError:
        where = f"at step {run.global_step + 1}" if run is not None else "while preparing the run"
        raise TrainingError(f"out of memory {where}; {OOM_HINT}") from None
    finally:
        accelerator.end_training()


def warn_small(photos, resolution: int, config: TrainConfig) -> None:
    if config.resolution is None:  # with an explicit --resolution, load_photos has warned already
        for p in photos:
            if min(p.image.size) < resolution:
                log.warning(
                    "%s is %dx%d, smaller than %d px: it will be upsampled",
                    p.path.name,
                    *p.image.size,
                    resolution,
                )


def build(run: Run, photos, classes, resume: Path | None) -> Parts:
    """Optimizer, data, schedules and trackers, prepared by accelerate; restores a checkpoint if given."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    cfg, acc, pipe, setup = run.config, run.accelerator, run.pipe, run.setup
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for name, model in setup.models.items():
            if name != "unet":
                model.gradient_checkpointing_enable()
    class_prompt = cfg.class_prompt if classes or cfg.output_preservation_weight else None
    prompts = PromptEncoder(
        pipe, run.sdxl, cfg.instance_prompt, class_prompt, train_text=cfg.train_text_encoder
    )
    optimizer = make_optimizer(cfg, setup.trainable_parameters(), acc.num_processes)
    loader, sampler = make_dataloader(cfg, photos, classes, run.resolution, run.data_seed)
    latents_of = VAELatents(pipe.vae)
    if cfg.cache_text_embeddings:
        prompts.precompute()
        run.offloaded += prompts.encoders
    if cfg.cache_latents:
        latents_of = LatentCache.build(pipe.vae, loader.dataset, acc.device)
        run.offloaded.append(pipe.vae)
    offload(run.offloaded, acc.device)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,  # accelerate steps it once per process
        num_training_steps=cfg.max_train_steps * acc.num_processes,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
    *models, optimizer, loader, lr_scheduler = acc.prepare(
        *setup.models.values(), optimizer, loader, lr_scheduler
    )
    prepared = dict(zip(setup.models, models, strict=True))
    if cfg.compile:  # the training forwards only; validation and saving use the modules themselves
        prepared = {name: torch.compile(model) for name, model in prepared.items()}
    if acc.num_processes > 1 and acc.is_main_process:
        log.info("data-parallel training on %d processes (%s)", acc.num_processes, acc.distributed_type.value)
    if cfg.train_text_encoder:  # gradients must flow through the prepared (possibly DDP-wrapped) encoders
        encoders = TEXT_COMPONENTS[: len(prompts.encoders)]
        prompts.encoders = [prepared.get(n, e) for n, e in zip(encoders, prompts.encoders, strict=True)]
    # accelerate saves optimizer, scheduler, grad scaler and RNG; the adapter tensors go to our own file
    acc.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    acc.register_load_state_pre_hook(lambda models, folder: models.clear())
    if acc.is_main_process and cfg.report_to != "none":
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
        acc.init_trackers("nblora-dreambooth", config=flat)
    if resume is not None:
        tensors, state = ckpt.read_state(resume)
        setup.load_state(tensors)  # checks that the checkpoint fits this adapter first
        acc.load_state(str(resume))
        run.global_step, run.last_checkpoint = int(state["global_step"]), resume
        if acc.is_main_process:
            log.info("resumed from %s at step %d", resume, run.global_step)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Parts(
        models=models,
        unet=prepared["unet"],
        optimizer=optimizer,
        loader=loader,
        sampler=sampler,
        lr_scheduler=lr_scheduler,
        noise_scheduler=noise_scheduler,
        prompts=prompts,
        latents_of=latents_of,
    )


def fit(
    run: Run, parts: Parts, callbacks: TrainCallbacks, should_stop: Callable[[], bool] | None
) -> TrainResult:
    """The training loop: optimizer steps until max_train_steps (or a stop), then the final adapter."""
    from tqdm.auto import tqdm

    cfg, acc, setup, loader = run.config, run.accelerator, run.setup, parts.loader
    per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    num_epochs = math.ceil(cfg.max_train_steps / per_epoch)
    first_epoch, skip = divmod(run.global_step, per_epoch)  # resume: position inside the epoch
    runlog = RunLog(run.output_dir, acc, run.global_step) if acc.is_main_process else None
    bar = tqdm(
        total=cfg.max_train_steps, initial=run.global_step, desc="steps", disable=not acc.is_main_process
    )
    for model in parts.models:
        model.train()
    t0, stopped, micro_losses = time.perf_counter(), False, []
    try:
        for epoch in range(first_epoch, num_epochs):
            if run.global_step >= cfg.max_train_steps or stopped:
                break
            loader.set_epoch(epoch)
            parts.sampler.set_epoch(epoch)
            loader.dataset.set_epoch(epoch)
            batches = loader
            if epoch == first_epoch and skip:
                batches = acc.skip_first_batches(loader, skip * cfg.gradient_accumulation_steps)
            for batch in batches:
                with acc.accumulate(*parts.models):
                    loss = dreambooth_loss(
                        batch,
                        parts.unet,
                        latents_of=parts.latents_of,
                        noise_scheduler=parts.noise_scheduler,
                        prompts=parts.prompts,
                        resolution=run.resolution,
                        weight_dtype=run.weight_dtype,
                        prior_loss_weight=cfg.prior_loss_weight,
                        snr_gamma=cfg.snr_gamma,
                        noise_offset=cfg.noise_offset,
                        output_preservation_weight=cfg.output_preservation_weight,
                        adapter_setup=setup,
                    )
                    check_finite(acc, loss, run)
                    micro_losses.append(loss.detach())
                    acc.backward(loss)
                    if acc.sync_gradients:
                        lr = parts.optimizer.param_groups[0]["lr"]  # the rate this step uses
                        if cfg.bernoulli_p is not None:
                            bernoulli_select(setup, cfg.bernoulli_p, run.data_seed, run.global_step)
                        if cfg.max_grad_norm > 0:
                            acc.clip_grad_norm_(setup.trainable_parameters(), cfg.max_grad_norm)
                    parts.optimizer.step()
                    if cfg.scale_weight_norms is not None and acc.sync_gradients:
                        scale_weight_norms(setup, cfg.scale_weight_norms)
                    parts.lr_scheduler.step()
                    parts.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                run.global_step += 1
                step_loss = float(acc.gather(torch.stack(micro_losses).mean()[None]).mean())
                micro_losses = []
                elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if runlog is not None:
                    norms = layer_norms(setup) if run.global_step % cfg.norm_logging_steps == 0 else None
                    runlog.step(run.global_step, step_loss, lr, elapsed, norms)
                if callbacks.on_step and acc.is_main_process:
                    callbacks.on_step(run.global_step, cfg.max_train_steps, step_loss, lr, elapsed)
                last = run.global_step >= cfg.max_train_steps
                stopped = not last and stop_requested(acc, should_stop)
                if run.global_step % cfg.checkpointing_steps == 0 or stopped:
                    save_checkpoint(run, callbacks)
                if cfg.validation_prompt and (run.global_step % cfg.validation_steps == 0 or last or stopped):
                    validate(run, runlog, callbacks)
                if last or stopped:
                    break
        save_final(run)
    finally:
        bar.close()
        if runlog is not None:
            runlog.close()
    return TrainResult(run.output_dir, run.global_step, run.last_checkpoint, stopped)


def stop_requested(acc, should_stop: Callable[[], bool] | None) -> bool:
    """should_stop() of the main process, shared with every process so that all stop at the same step."""
    flag = bool(should_stop()) if should_stop is not None and acc.is_main_process else False
    if acc.num_processes > 1:
        flag = bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), "sum").item() > 0)
    return flag


def check_finite(acc, loss: torch.Tensor, run: Run) -> None:
    value = acc.gather(loss.detach()[None])
    if not bool(torch.isfinite(value).all()):
        bad = float(value[~torch.isfinite(value)][0])
        where = (
            f"the last good checkpoint is {run.last_checkpoint}"
            if run.last_checkpoint
            else "no checkpoint yet"
        )
        raise TrainingError(
            f"loss is {bad} at step {run.global_step + 1}: training stopped, {where} "
            "(try a lower --learning_rate)"
        )


def bernoulli_select(setup: AdapterSetup, q: float, seed: int, step: int) -> None:
    """Bernoulli-LoRA: this step updates only the input factors (prob. q) or only the output factors.

    The other group's gradients are dropped (None), so AdamW skips those tensors entirely: no
    momentum or weight-decay update either. Bound parameters (s̃, d̃, DoRA magnitudes) train every step.
    The draw depends on (seed, step) alone: every process of a data-parallel run picks the same group
    (after the gradient all-reduce their updates must stay identical), and a resumed run repeats it.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    update_input = bool(torch.rand((), generator=gen) < q)
    inputs, outputs = setup.factor_groups()
    for p in outputs if update_input else inputs:
        p.grad = None
