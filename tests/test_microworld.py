"""The micro world: renders, captions, subjects, judges and the short mode of the pretraining command."""

import pytest
import torch

from eval.dataset import read_dataset
from nblora_diffusion.metrics import MicroWorldConfig, MicroWorldSuite, prompt_attributes
from nblora_diffusion.microworld import gates, judges, subjects
from nblora_diffusion.microworld.pretrain import held_out, training_scenes
from nblora_diffusion.microworld.world import (
    COLOR_NAMES,
    KINDS,
    Scene,
    caption,
    random_scenes,
    render,
    to_pil,
)
from nblora_diffusion.training.setup import check_resolution


def test_renders_are_deterministic_and_in_range():
    a = render(random_scenes(8, torch.Generator().manual_seed(3)), torch.Generator().manual_seed(4))
    b = render(random_scenes(8, torch.Generator().manual_seed(3)), torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_bad_scene_attributes_are_one_line_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        Scene("hexagon", "red", "blue", "left")
    with pytest.raises(ValueError, match="same colour"):
        Scene("circle", "red", "red", "left")


def test_captions_name_the_attributes_and_read_back():
    s = Scene("ring", "orange", "green", "right")
    text = caption(s)
    assert text == "a photo of an orange ring on a green background on the right"
    assert prompt_attributes(text) == {
        "kind": "ring",
        "color": "orange",
        "background": "green",
        "position": "right",
    }
    assert prompt_attributes("a photo of sks circle on a blue background") == {
        "kind": "circle",
        "background": "blue",
    }
    assert prompt_attributes("a photo of a red sks square") == {"kind": "square", "color": "red"}


def test_held_out_triples_never_reach_pretraining_but_every_value_does():
    scenes = training_scenes(2000, torch.Generator().manual_seed(0))
    assert not any(held_out(s.kind, s.color, s.background) for s in scenes)
    assert {s.kind for s in scenes} == set(KINDS) and {s.color for s in scenes} == set(COLOR_NAMES)
    triples = [(k, c, b) for k in KINDS for c in COLOR_NAMES for b in COLOR_NAMES if c != b]
    share = sum(held_out(*t) for t in triples) / len(triples)
    assert 0.08 < share < 0.15


def test_exact_readers_read_clean_renders():
    acc = judges.judge_accuracy(judges.JudgeNet(), n=256)  # an untrained net: only the exact readers count
    assert acc["background"] >= 0.99 and acc["color"] >= 0.97 and acc["position"] >= 0.97


def test_subject_dataset_has_the_dreambooth_layout(tmp_path):
    root = subjects.write_dataset(tmp_path / "micro")
    data = read_dataset(root)
    assert set(data.subjects) == {s.name for s in subjects.SUBJECTS}
    assert data.subjects["striped_circle"].class_noun == "circle"
    assert len(data.prompts.object) >= 20
    assert len(list((root / "spotted_square").glob("*.png"))) == subjects.PHOTOS
    # the subject is never a plain object, and its photos vary background and position
    for s in subjects.SUBJECTS:
        scenes = subjects.photo_scenes(s)
        assert s.pattern != "plain" and len({x.background for x in scenes}) >= 3
        assert {x.position for x in scenes} == {"left", "center", "right"}


def test_the_shipped_judge_reads_kind_and_pattern():
    net = judges.load_judge()
    for augment in (False, True):
        acc = judges.judge_accuracy(net, n=512, seed=99, augment=augment)
        # measured on 1024 renders: kind 99.8%, pattern 96.4% (any second colour, radii 0.15-0.27)
        assert acc["kind"] >= 0.95 and acc["pattern"] >= 0.95, acc


def test_micro_suite_scores_photos_as_their_subject_and_others_not():
    suite = MicroWorldSuite(MicroWorldConfig()).load()
    stripes = to_pil(subjects.photos(subjects.subject("striped_circle")))
    spots = to_pil(subjects.photos(subjects.subject("spotted_square")))
    ref = suite.reference(stripes, ["a photo of circle"])
    assert ref["subject_acc"].mean == 1.0 and ref["subject"].mean > 0.8
    same = suite.score(stripes[:2], [stripes[2:]], ["a photo of circle"])
    other = suite.score(stripes[:2], [spots], ["a photo of circle"])
    assert same["subject_acc"].mean == 1.0 and other["subject_acc"].mean == 0.0
    assert same["subject"].mean > other["subject"].mean + 0.5
    plain = Scene("circle", "red", "blue", "left")
    prompt = suite.score(
        stripes[:2], [to_pil(render([plain]))], ["a photo of a red circle on a blue background on the left"]
    )
    assert prompt["prompt"].mean == 1.0


def test_short_pretraining_writes_a_loadable_pipeline_and_resumes(tmp_path):
    from nblora_diffusion.diffusion import load_pipeline
    from nblora_diffusion.microworld.cli import main

    small = ["--vae_steps", "2", "--pool", "64", "--batch", "4", "--vae_batch", "4", "--save_every", "1"]
    assert main(["pretrain", "--out", str(tmp_path), *small, "--steps", "1"]) == 0
    state = torch.load(tmp_path / "pretrain_state.pt", weights_only=False)
    assert state["diffusion"]["step"] == 1
    assert main(["pretrain", "--out", str(tmp_path), *small, "--steps", "2"]) == 0  # resumes, one more step
    state = torch.load(tmp_path / "pretrain_state.pt", weights_only=False)
    assert state["diffusion"]["step"] == 2 and len(state["diffusion"]["history"]) == 2
    assert main(["pretrain", "--out", str(tmp_path), *small[:-2], "--seed", "1"]) == 2  # other settings
    pipe = load_pipeline(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32) and pipe.vae_scale_factor == 2
    # the trainer checks the resolution against this model's own factors (x2 VAE, x4 UNet), not SD's x8
    check_resolution(pipe, 40)
    with pytest.raises(
        ValueError, match=r"multiple of 8 for this model \(the VAE downsamples x2, the UNet x4\)"
    ):
        check_resolution(pipe, 36)
    # the gates command reads the model back with the judges (numbers meaningless for 2 steps)
    report = gates.measure(tmp_path / "model", seeds=1, limit=6)
    assert set(report["accuracy"]) == {"background", "color", "kind", "position"} and report["images"] == 6
    assert set(report["base_draws_subject"]) == {s.name for s in subjects.SUBJECTS}


def test_resolution_check_follows_the_model():
    from nblora_diffusion.diffusion import load_pipeline
    from nblora_diffusion.testing import tiny_sd_path

    pipe = load_pipeline(tiny_sd_path())  # x8 VAE, 2-level UNet: multiples of 16
    check_resolution(pipe, 48)
    with pytest.raises(
        ValueError, match=r"multiple of 16 for this model \(the VAE downsamples x8, the UNet x2\)"
    ):
        check_resolution(pipe, 40)
