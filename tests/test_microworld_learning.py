"""DreamBooth on the pretrained micro SD learns the subject: measured by the micro world's judges.

Each assertion compares with the base model or another run, and the negative control shows that the
fidelity check fails for a trainer that learns nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nblora_diffusion import diffusion
from nblora_diffusion.metrics import MicroWorldSuite
from nblora_diffusion.metrics.microworld import drift_score, to_tensor
from nblora_diffusion.microworld import model_path, subjects
from nblora_diffusion.training import TrainConfig, train

pytestmark = pytest.mark.slow
try:
    model_path()
except ValueError as e:  # the weights ship once the pretraining has passed its gates
    pytest.skip(f"the micro SD is not pretrained yet: {e}", allow_module_level=True)

SUBJECT = subjects.subject("striped_circle")
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "microworld"
INSTANCE = "a photo of sks circle"
CLASS = "a photo of a circle"
RECONTEXT = [f"a photo of sks circle on a {c} background" for c in ("green", "purple")] + [
    "a photo of sks circle on the left"
]
N = 16  # images per prompt
ACC = 0.3  # share of images the judge must read as the subject (the base: 1 of 16; the run: 13 of 16)


def config(out: Path, **changes) -> TrainConfig:
    values = dict(
        pretrained_model_name_or_path=str(model_path()),
        instance_data_dir=str(ASSETS / SUBJECT.name),
        instance_prompt=INSTANCE,
        with_prior_preservation=False,  # on in the prior-preservation test (it slows the subject down)
        class_prompt=CLASS,
        class_data_dir=str(out.parent / "class_images"),  # shared by the runs of a module
        num_class_images=20,
        class_inference_steps=20,
        sample_batch_size=20,
        output_dir=str(out),
        resolution=32,
        prior_loss_weight=0.3,
        train_batch_size=5,  # every photo in every step (batch 4 alternated steps of 4 and 1 photos)
        max_train_steps=300,  # 49-54 s of training on one core
        learning_rate=5e-3,
        norm_p="inf",
        norm_bound=4.0,
        rank=8,
        checkpointing_steps=1000,
        report_to="none",
        norm_logging_steps=50,
        cache_latents=True,  # the same numbers as encoding every step (checked bit for bit), ~10% faster
        cache_text_embeddings=True,
        seed=0,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("micro")


@pytest.fixture(scope="module")
def suite():
    return MicroWorldSuite().load()


@pytest.fixture(scope="module")
def base():
    pipe = diffusion.load_pipeline(model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, n: int = N, seed: int = 0) -> list:
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt=[prompt] * n, generator=gens, num_inference_steps=20, guidance_scale=5.0).images


def adapted(folder: Path):
    """The base with the run's adapter: NB-LoRA by load_adapter, a PEFT LoRA by its diffusers file."""
    pipe = diffusion.load_pipeline(model_path())
    pipe.set_progress_bar_config(disable=True)
    if (folder / "nblora_config.json").is_file():
        diffusion.load_adapter(pipe, folder)
    else:
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    return pipe


def subject_scores(suite, images) -> tuple[float, float]:
    """(share of images the judge reads as the subject, judge-feature similarity to the photos)."""
    stats = suite.score(to_pil_photos(), [images], [INSTANCE])
    return stats["subject_acc"].mean, stats["subject"].mean


def to_pil_photos():
    from nblora_diffusion.microworld.world import to_pil

    return to_pil(subjects.photos(SUBJECT))


@pytest.fixture(scope="module")
def nblora_run(root):
    out = root / "nblora"
    train(config(out))
    return out


def test_dreambooth_draws_the_subject_the_base_cannot(nblora_run, base, suite):
    base_acc, base_fid = subject_scores(suite, generate(base, INSTANCE))
    acc, fid = subject_scores(suite, generate(adapted(nblora_run), INSTANCE))
    photos_fid = suite.reference(to_pil_photos(), [INSTANCE])["subject"].mean
    assert base_acc <= 0.1 and acc >= ACC, (base_acc, acc)
    assert fid >= base_fid + 0.3 and fid >= 0.7 * photos_fid, (base_fid, fid, photos_fid)


def test_slider_zero_is_the_base_model_and_fidelity_rises_with_delta(nblora_run, base, suite):
    pipe = adapted(nblora_run)
    base_images = to_tensor(generate(base, INSTANCE, n=8))
    fid = []
    for scale in (0.0, 0.25, 0.5, 1.0):
        diffusion.set_norm_bound(pipe, scale=scale)
        images = generate(pipe, INSTANCE, n=8)
        if scale == 0.0:
            assert torch.equal(to_tensor(images), base_images)
        fid.append(subject_scores(suite, images)[1])
    assert all(b >= a - 0.01 for a, b in zip(fid, fid[1:], strict=False)), fid
    assert fid[-1] > fid[0] + 0.1, fid


def test_prior_preservation_keeps_class_images_closer_to_the_base(nblora_run, root, base, suite):
    with_prior = root / "prior"
    train(config(with_prior, with_prior_preservation=True, prior_loss_weight=1.0))  # DreamBooth's λ = 1
    reference = generate(base, CLASS)
    prior_pipe = adapted(with_prior)
    drift_with = drift_score(reference, generate(prior_pipe, CLASS)).mean
    drift_without = drift_score(reference, generate(adapted(nblora_run), CLASS)).mean
    assert drift_with < drift_without, (drift_with, drift_without)
    # ... while the subject is still learned (a trainer that learns nothing keeps the class images too).
    # Measured: class drift 0.270 with the prior, 0.355 without; subject fidelity 0.606 (base 0.096; the
    # judge's share 7/16, too few images for a robust count with the prior slowing the subject down)
    _, base_fid = subject_scores(suite, generate(base, INSTANCE))
    _, fid = subject_scores(suite, generate(prior_pipe, INSTANCE))
    assert fid >= base_fid + 0.3, (base_fid, fid)


def test_small_bound_keeps_prompt_fidelity_better_than_lora_at_a_high_learning_rate(root, base, suite):
    small = root / "nblora_small"
    train(config(small, norm_bound=0.25))
    lora = root / "lora_high_lr"
    train(config(lora, adapter="lora", learning_rate=3e-2))

    def prompt_fidelity(folder):
        pipe = adapted(folder)
        groups = [generate(pipe, p, n=8) for p in RECONTEXT]
        return suite.score(to_pil_photos(), groups, RECONTEXT)["prompt"].mean

    nb, lo = prompt_fidelity(small), prompt_fidelity(lora)
    assert nb > lo, (nb, lo)
    # ... and the small bound has learned the subject's look meanwhile (a trainer that learns nothing keeps
    # the prompt too): measured fidelity 0.49 against the base's 0.10
    base_fid = subject_scores(suite, generate(base, INSTANCE))[1]
    fid = subject_scores(suite, generate(adapted(small), INSTANCE))[1]
    assert fid >= base_fid + 0.28, (base_fid, fid)


def test_exported_plain_lora_in_stock_diffusers_draws_the_subject(nblora_run, suite):
    from diffusers import StableDiffusionPipeline

    # the weights are stored in fp16: without torch_dtype transformers keeps the text encoder in fp16
    pipe = StableDiffusionPipeline.from_pretrained(model_path(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(nblora_run), weight_name="pytorch_lora_weights.safetensors")
    acc, _ = subject_scores(suite, generate(pipe, INSTANCE))
    assert acc >= ACC, acc


def test_negative_control_a_trainer_that_learns_nothing_fails_the_fidelity_check(root, suite):
    out = root / "no_learning"
    train(config(out, learning_rate=1e-9, max_train_steps=20))
    acc, _ = subject_scores(suite, generate(adapted(out), INSTANCE))
    assert acc < ACC, acc  # the threshold the learning test uses


def test_eval_benchmark_runs_unchanged_on_the_micro_subjects_with_the_micro_metrics(tmp_path):
    import json

    from eval.cli import main

    methods = tmp_path / "methods.json"
    methods.write_text(
        json.dumps(
            {
                "train": {"max_train_steps": 100, "checkpointing_steps": 50, "learning_rate": 3e-3, "rank": 8,
                          "train_batch_size": 4, "resolution": 32, "seed": 0, "report_to": "none"},
                "methods": [
                    {"id": "nblora_small", "name": "NB-LoRA δ=0.25", "adapter": "nblora", "rank": 8,
                     "norm_p": "inf", "norm_bound": 0.25},
                    {"id": "nblora_large", "name": "NB-LoRA δ=4", "adapter": "nblora", "rank": 8,
                     "norm_p": "inf", "norm_bound": 4.0},
                ],
            }
        )
    )  # fmt: skip
    out = tmp_path / "bench"
    args = ["benchmark", "--dataset", str(ASSETS), "--subjects", SUBJECT.name,
            "--base_model", str(model_path()),
            "--methods", str(methods), "--out", str(out), "--metrics", "microworld", "--max_prompts", "4",
            "--images_per_prompt", "4", "--num_inference_steps", "20", "--guidance_scale", "5",
            "--no_save_images"]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    assert results["fidelity"] == "subject" and results["text"] == "prompt"
    best = {m["id"]: m["steps"][str(m["best_dino_step"])] for m in results["methods"]}
    assert best["nblora_large"]["subject"]["mean"] > best["nblora_small"]["subject"]["mean"]
    # ... because the large bound has learned the subject (measured: 69% of its images read as the subject)
    assert best["nblora_large"]["subject_acc"]["mean"] >= ACC, best["nblora_large"]["subject_acc"]
    assert "drift" in best["nblora_large"] and (out / "report" / "tradeoff_subject_prompt.png").is_file()
