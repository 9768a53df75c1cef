"""Pretraining of the micro Stable Diffusion on the micro world: VAE first, then UNet + text encoder.

    python -m nblora_diffusion.microworld pretrain --out DIR [--vae_steps N] [--steps N] [--seed S]

Resumable: the state (weights, EMA, optimizer, RNG, step) is written atomically to DIR/pretrain_state.pt
every ``--save_every`` steps and picked up by the same command. The finished model is written to
DIR/model as a diffusers StableDiffusionPipeline folder (EMA weights, fp16 safetensors).
Held-out (kind, colour, background) combinations (``held_out``) never appear in pretraining captions,
so the quality gates measure composition, not memory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..training.text import tokenize
from . import models
from .world import COLOR_NAMES, COLORS, KINDS, PATTERNS, POSITIONS, Scene, caption, random_scenes, render

log = logging.getLogger(__name__)
STATE_FILE = "pretrain_state.pt"
# may change between a run and its resume (the history records the noise offset of every stretch)
_MAY_CHANGE = ("vae_steps", "steps", "save_every", "noise_offset")


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    vae_steps: int = 1750
    vae_batch: int = 16
    vae_lr: float = 1e-3
    pool: int = 32768  # training scenes rendered and encoded once; captions are drawn anew each step
    steps: int = 6400
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    # per-image, per-channel constant added to the noise: without it the last timesteps keep enough of the
    # background in the mean of 16 x 16 latents that the UNet reads it from there, never from the prompt
    noise_offset: float = 0.3
    caption_dropout: float = 0.1  # empty caption: the unconditional branch of classifier-free guidance
    keep_attribute: float = 0.85  # each of colour/background/position named with this probability
    save_every: int = 250


def held_out(kind: str, color: str, background: str) -> bool:
    """About 1 in 9 (kind, colour, background) triples, never shown in pretraining; every single value
    of each attribute still appears."""
    return (KINDS.index(kind) + 2 * COLOR_NAMES.index(color) + 4 * COLOR_NAMES.index(background)) % 9 == 0


def training_scenes(n: int, g: torch.Generator) -> list[Scene]:
    out: list[Scene] = []
    while len(out) < n:
        out += [s for s in random_scenes(2 * n, g) if not held_out(s.kind, s.color, s.background)]
    return out[:n]


def _vae_scenes(n: int, g: torch.Generator) -> list[Scene]:
    """Plain and patterned scenes with any second colour: the VAE must keep what subjects show."""
    scenes = random_scenes(n, g)
    pats = torch.randint(len(PATTERNS), (n,), generator=g).tolist()
    second = torch.rand(n, 3, generator=g).tolist()
    return [
        Scene(**{**asdict(s), "pattern": PATTERNS[p], "pattern_color": tuple(c)})
        for s, p, c in zip(scenes, pats, second, strict=True)
    ]


def _save_state(out: Path, state: dict) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train_vae(cfg: PretrainConfig, out: Path, state: dict) -> None:
    vae = models.make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if "vae_progress" in state:
        vae.load_state_dict(state["vae_progress"]["model"])
        opt.load_state_dict(state["vae_progress"]["opt"])
        step = state["vae_progress"]["step"]
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 1 + step)
    t0 = time.time()
    while step < cfg.vae_steps:
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = render(_vae_scenes(cfg.vae_batch, g), g) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == cfg.vae_steps:
            psnr = -10 * math.log10(max(F.mse_loss(rec.detach(), x).item() / 4, 1e-12))
            log.info(
                "vae step %d/%d loss %.5f psnr %.1f dB (%.1f s)",
                step,
                cfg.vae_steps,
                loss.item(),
                psnr,
                time.time() - t0,
            )
        if step % cfg.save_every == 0 or step == cfg.vae_steps:
            state["vae_progress"] = {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}
            _save_state(out, state)
    # latent scale: unit variance of the latents, as SD's 0.18215
    with torch.no_grad():
        x = render(training_scenes(256, g), g) * 2 - 1
        z = vae.encode(x).latent_dist.mean
    state["vae"] = vae.state_dict()
    state["vae_scaling"] = float(1.0 / z.std())
    state["vae_shift"] = 0.0
    state.pop("vae_progress", None)
    _save_state(out, state)
    log.info("vae done: scaling factor %.4f", state["vae_scaling"])


def _encode_text(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, prompts))[0]  # (B, L, width)


@torch.no_grad()
def encode_pool(
    vae, scenes: list[Scene], g: torch.Generator, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and standard deviations (scaled) of the rendered scenes."""
    means, stds = [], []
    for i in range(0, len(scenes), chunk):
        dist = vae.encode(render(scenes[i : i + chunk], g) * 2 - 1).latent_dist
        means.append(dist.mean * vae.config.scaling_factor)
        stds.append(dist.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def _noisy(scheduler, mean, std, g, offset: float = 0.0):
    z = mean + std * torch.randn(mean.shape, generator=g)
    noise = torch.randn(z.shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn((*z.shape[:2], 1, 1), generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=g)
    return scheduler.add_noise(z, noise, t), noise, t


def train_diffusion(cfg: PretrainConfig, out: Path, state: dict) -> None:
    vae = models.make_vae()
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=state["vae_scaling"])
    vae.requires_grad_(False).eval()
    tokenizer = models.make_tokenizer()
    torch.manual_seed(cfg.seed)
    unet, text_encoder = models.make_unet(), models.make_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema_unet, ema_te = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    step, history = 0, []
    if "diffusion" in state:
        d = state["diffusion"]
        unet.load_state_dict(d["unet"])
        text_encoder.load_state_dict(d["text_encoder"])
        ema_unet.load_state_dict(d["ema_unet"])
        ema_te.load_state_dict(d["ema_text_encoder"])
        opt.load_state_dict(d["opt"])
        step, history = d["step"], d["history"]
    scheduler = models.make_train_scheduler()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 2 + step)
    pool_g = torch.Generator().manual_seed(cfg.seed * 1000 + 4)  # the same pool on resume
    t0 = time.time()
    pool = training_scenes(cfg.pool, pool_g)
    pool_mean, pool_std = encode_pool(vae, pool, pool_g)
    log.info("latent pool of %d scenes in %.0f s", len(pool), time.time() - t0)
    probe_g = torch.Generator().manual_seed(cfg.seed * 1000 + 3)  # fixed probe batch for the gap
    probe_scenes = training_scenes(256, probe_g)
    probe = (
        *_noisy(scheduler, *encode_pool(vae, probe_scenes, probe_g), probe_g),
        [caption(s) for s in probe_scenes],
    )
    shuffled = [probe[3][i] for i in torch.randperm(len(probe_scenes), generator=probe_g).tolist()]
    t0 = time.time()
    unet.train()
    text_encoder.train()
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) * 0.9 + 0.1  # cosine to 10%
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(pool), (cfg.batch,), generator=g)
        drop = (torch.rand(cfg.batch, generator=g) < cfg.caption_dropout).tolist()
        prompts = [
            "" if d else caption(pool[i], g, cfg.keep_attribute)
            for i, d in zip(idx.tolist(), drop, strict=True)
        ]
        noisy, noise, t = _noisy(scheduler, pool_mean[idx], pool_std[idx], g, cfg.noise_offset)
        pred = unet(noisy, t, _encode_text(tokenizer, text_encoder, prompts)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        if step % 50 == 0:
            log.info(
                "step %d/%d loss %.4f lr %.2e (%.0f s)", step, cfg.steps, loss.item(), lr, time.time() - t0
            )
        if step % cfg.save_every == 0 or step == cfg.steps:
            matched, mismatched = conditioning_gap(ema_unet, ema_te, tokenizer, probe, shuffled)
            history.append(
                {
                    "step": step, "loss": loss.item(), "matched": matched, "shuffled": mismatched,
                    "noise_offset": cfg.noise_offset,
                }
            )  # fmt: skip
            log.info(
                "step %d: probe loss matched %.4f shuffled %.4f (gap %.4f)",
                step,
                matched,
                mismatched,
                mismatched - matched,
            )
            state["diffusion"] = {
                "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet.state_dict(), "ema_text_encoder": ema_te.state_dict(),
                "opt": opt.state_dict(), "step": step, "history": history,
            }  # fmt: skip
            _save_state(out, state)


@torch.no_grad()
def conditioning_gap(unet, text_encoder, tokenizer, probe, shuffled) -> tuple[float, float]:
    """Denoising loss of a fixed batch with its own captions and with shuffled ones: a model that uses
    its prompt does clearly better with the matched captions."""
    noisy, noise, t, prompts = probe
    losses = []
    for caps in (prompts, shuffled):
        pred = unet(noisy, t, _encode_text(tokenizer, text_encoder, caps)).sample
        losses.append(float(F.mse_loss(pred, noise)))
    return losses[0], losses[1]


def export(cfg: PretrainConfig, out: Path, state: dict, elapsed: float) -> Path:
    """DIR/model: the EMA weights as a StableDiffusionPipeline folder (fp16 safetensors)."""
    from diffusers import StableDiffusionPipeline

    from ..testing.tiny_sd import write_bpe_files
    from .world import WORDS

    tokenizer = models.make_tokenizer()
    vae, unet, te = models.make_vae(), models.make_unet(), models.make_text_encoder(tokenizer)
    vae.load_state_dict(state["vae"])
    vae.register_to_config(scaling_factor=state["vae_scaling"])
    unet.load_state_dict(state["diffusion"]["ema_unet"])
    te.load_state_dict(state["diffusion"]["ema_text_encoder"])
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=models.make_inference_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(torch.float16)
    target = out / "model"
    tmp = out / ".model.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_bpe_files(tmp, WORDS)
    info = {
        "command": "python -m nblora_diffusion.microworld pretrain --out DIR",
        "config": asdict(cfg),
        "pretrain_seconds": round(elapsed),
        "torch": torch.__version__,
        "conditioning_history": state["diffusion"]["history"],
        "palette": COLORS,
        "positions": POSITIONS,
    }
    (tmp / "microworld.json").write_text(json.dumps(info, indent=2) + "\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def pretrain(cfg: PretrainConfig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict = {}
    if (out / STATE_FILE).is_file():
        state = torch.load(out / STATE_FILE, weights_only=False)
        old, new = (
            {k: v for k, v in c.items() if k not in _MAY_CHANGE}
            for c in (state.get("config", {}), asdict(cfg))
        )
        if old != new:  # only the lengths and the noise offset may change
            raise ValueError(f"{out / STATE_FILE} was made with other settings: {state.get('config')}")
        log.info("resuming from %s", out / STATE_FILE)
    state["config"] = asdict(cfg)
    t0 = time.time() - state.get("elapsed", 0.0)
    if "vae" not in state:
        train_vae(cfg, out, state)
    state["elapsed"] = time.time() - t0
    if state.get("diffusion", {}).get("step", 0) < cfg.steps:
        train_diffusion(cfg, out, state)
    state["elapsed"] = time.time() - t0
    _save_state(out, state)
    return export(cfg, out, state, state["elapsed"])
