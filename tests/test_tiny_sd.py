"""The offline tiny Stable Diffusion factories load through the stock diffusers pipeline classes."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from nblora_diffusion.testing import make_tiny_sd, tiny_sd_path
from nblora_diffusion.testing.tiny_sd import main, tiny_vocab


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_tiny_pipeline_loads_offline_with_stock_class_and_generates_64px(sdxl):
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_sd_path(sdxl=sdxl))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8  # the real ×8 VAE downsampling
    assert (getattr(pipe, "text_encoder_2", None) is not None) == sdxl
    assert pipe.unet.config.use_linear_projection == sdxl  # SD1.x: Conv2d proj_in/out; SDXL: Linear
    gen = torch.Generator().manual_seed(0)
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=gen, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_tokenizer_keeps_prompt_words_whole_and_pads_to_clip_length():
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path())
    vocab, _ = tiny_vocab()
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length").input_ids
    assert len(ids) == 77
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "sks", "dog")]
    assert ids[:7] == [vocab["<|startoftext|>"], *words, vocab["<|endoftext|>"]]
    assert max(vocab.values()) < pipe.text_encoder.config.vocab_size


def test_same_seed_gives_same_weights_and_other_seed_differs(tmp_path):
    a = make_tiny_sd(tmp_path / "a", seed=1)
    b = make_tiny_sd(tmp_path / "b", seed=1)
    c = make_tiny_sd(tmp_path / "c", seed=2)
    wa, wb, wc = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert json.loads((a / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert (a / "tokenizer" / "vocab.json").is_file() and (a / "tokenizer" / "merges.txt").is_file()


def test_cli_writes_sdxl_folder_and_refuses_a_non_empty_one(tmp_path, capsys):
    out = tmp_path / "xl"
    assert main([str(out), "--sdxl"]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"text_encoder_2", "tokenizer_2"} <= set(index)
    capsys.readouterr()
    assert main([str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary folder left behind


def test_tiny_sd_path_is_built_once_per_process():
    assert tiny_sd_path() == tiny_sd_path()
    assert tiny_sd_path(sdxl=True) != tiny_sd_path()
