"""testing.ldm_layout is the inverse of diffusers' single-file converters: diffusers -> LDM -> diffusers
gives back every tensor, bit for bit, and the LDM keys are the ones real checkpoints hold."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import single_file_utils as sfu

from nblora_diffusion.testing import ldm_layout as L
from nblora_diffusion.testing import tiny_sd_path


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sdxl"])
def pipe(request):
    return DiffusionPipeline.from_pretrained(tiny_sd_path(sdxl=request.param))


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


def test_unet_and_vae_round_trip_through_diffusers_converters(pipe):
    ldm = L.pipeline_to_ldm(pipe)
    assert_same_tensors(sfu.convert_ldm_unet_checkpoint(ldm, pipe.unet.config), pipe.unet.state_dict())
    assert_same_tensors(sfu.convert_ldm_vae_checkpoint(ldm, pipe.vae.config), pipe.vae.state_dict())


def test_text_encoders_round_trip_through_diffusers_converters(pipe):
    ldm = L.pipeline_to_ldm(pipe)
    clip = sfu.convert_ldm_clip_checkpoint(ldm)  # the CLIP-L encoder: SD1.x's, or SDXL's first
    clip.pop("text_model.embeddings.position_ids")  # a buffer in the files, not a weight of the model
    expected = {f"text_model.{k}".replace("text_model.text_model.", "text_model."): v
                for k, v in pipe.text_encoder.state_dict().items()}  # fmt: skip
    assert_same_tensors(clip, expected)
    if getattr(pipe, "text_encoder_2", None) is not None:
        te2 = pipe.text_encoder_2
        converted = sfu.convert_open_clip_checkpoint(te2, ldm, prefix=L.SDXL_OPEN_CLIP_PREFIX)
        assert_same_tensors(converted, te2.state_dict())


def test_open_clip_layout_of_sd2_round_trips(pipe):
    """SD2.x's OpenCLIP layout (cond_stage_model.model.*), checked on the tiny CLIP encoder."""
    te = pipe.text_encoder
    ldm = {L.SD2_OPEN_CLIP_PREFIX + k: v for k, v in L.open_clip_to_ldm(te.state_dict()).items()}
    assert sfu.is_open_clip_model(ldm)
    converted = sfu.convert_open_clip_checkpoint(te, ldm, prefix=L.SD2_OPEN_CLIP_PREFIX)
    expected = {f"text_model.{k}".replace("text_model.text_model.", "text_model."): v
                for k, v in te.state_dict().items()}  # fmt: skip
    assert_same_tensors(converted, expected)


def test_checkpoint_keys_are_the_real_single_file_names(pipe):
    ldm = L.pipeline_to_ldm(pipe)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    assert "model.diffusion_model.input_blocks.0.0.weight" in ldm
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in ldm
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # a 1×1 conv, as LDM saves it
    if sdxl:
        assert "model.diffusion_model.label_emb.0.0.weight" in ldm  # the text-time embedding
        assert sfu.is_clip_sdxl_model(ldm) and sfu.is_open_clip_sdxl_model(ldm)
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in ldm
    else:
        # transformers 5 saves CLIPTextModel without `text_model.`; real SD1.x files keep it
        assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ldm
        assert sfu.is_clip_model(ldm) and not any(k.startswith("conditioner.") for k in ldm)
