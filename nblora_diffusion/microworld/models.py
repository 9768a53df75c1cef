"""The micro Stable Diffusion's architecture: the real diffusers/transformers classes at micro size.

AutoencoderKL ×2 (32 px images <-> 12 × 16 × 16 latents, nearly lossless on the world's flat colours),
UNet2DConditionModel with cross-attention at the 8 × 8 and 4 × 4 levels, a 3-layer CLIPTextModel and a
CLIPTokenizer
whose vocabulary has one token per word of the world (``world.WORDS``; any other word falls back to
byte-level characters, as in CLIP's BPE).
"""

from __future__ import annotations

from .world import SIZE, WORDS

LATENT = SIZE // 2  # 16 × 16 latents
# 12 channels hold a 2 × 2 RGB block each (3072 numbers either side): the VAE can be nearly lossless,
# so subjects' stripes and spots survive it (with 4 channels it blurred them away)
LATENT_CHANNELS = 12
TEXT_WIDTH = 64
MAX_LENGTH = 32  # context length of the micro tokenizer (prompts of the world need ~15)


def make_tokenizer():
    from ..testing.tiny_sd import bpe_tokenizer

    return bpe_tokenizer(WORDS, max_length=MAX_LENGTH)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,  # 2 levels: ×2 downsampling
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="gelu",
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        # 16 × 16 -> 8 × 8 -> 4 × 4; attention at the two coarse levels (at 16 × 16 it would triple the cost)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=32,
    )  # SD1.x layout: Conv2d proj_in/proj_out, to_q/to_k/to_v/to_out.0 in every attention


def make_train_scheduler():
    from diffusers import DDPMScheduler

    # SD's training noise schedule
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1,
    )  # fmt: skip


def make_inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )  # fmt: skip
