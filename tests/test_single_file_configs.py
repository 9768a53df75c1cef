"""The shipped config skeletons (SD1.5, SD2.1-base, SD2.1-v, SDXL base) are the real models, and the CLIP
tokenizer generated from open_clip's BPE merges is CLIP's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from nblora_diffusion.diffusion import single_file as sf
from nblora_diffusion.testing import ldm_layout as L

# parameter counts of the published models (UNet, VAE, text encoder(s)) at these configs
PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21-base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd21-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl-base": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}
DIFFUSERS_TYPE = {"sd15": "v1", "sd21-base": "v2", "sd21-v": "v2", "sdxl-base": "xl_base"}
PROMPTS = (
    "a photo of sks dog",
    "A Photo of a DOG on the beach, 4k, highly-detailed!!",
    "it's a dog that'll sit; we're sure",
    "  multiple   spaces\tand\ttabs\n",
    "café crème brûlée, naïve",
    "12345 678.9 #1 @home",
    "emoji 🐶 dog",
    "日本語のテキスト",
)


@pytest.fixture(scope="module")
def skeletons(tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return {name: sf.skeleton_dir(name, cache) for name in sf.SKELETONS}


def meta_components(folder: Path) -> dict[str, torch.nn.Module]:
    """The pipeline's models built from the skeleton's configs, with no memory for their weights."""
    with init_empty_weights():
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if (folder / "text_encoder_2").is_dir():
            cfg = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(cfg)
    return parts


@pytest.mark.parametrize("name", list(sf.SKELETONS))
def test_skeleton_builds_the_published_models(skeletons, name):
    parts = meta_components(skeletons[name])
    counts = {part: sum(p.numel() for p in model.parameters()) for part, model in parts.items()}
    assert counts == PUBLISHED[name]
    index = json.loads((skeletons[name] / "model_index.json").read_text())
    assert index["_class_name"] == sf.PIPELINE_CLASSES[sf.SKELETONS[name]]
    assert set(parts) | {"scheduler", "tokenizer"} <= set(index)


@pytest.mark.parametrize("name", list(sf.SKELETONS))
def test_checkpoint_keys_of_a_skeleton_are_inferred_and_converted_back_exactly(skeletons, name):
    """The key list of a real-size checkpoint (the skeleton's models in the LDM layout): diffusers'
    inference names the right family (its markers need the real layer counts and widths) and its
    converters give exactly the models' keys and shapes."""
    parts = meta_components(skeletons[name])
    arch = sf.SKELETONS[name]
    unet, vae, te = parts["unet"], parts["vae"], parts["text_encoder"]
    ldm = {L.UNET_PREFIX + k: v for k, v in L.unet_to_ldm(unet.state_dict(), unet.config).items()}
    ldm.update({L.VAE_PREFIX + k: v for k, v in L.vae_to_ldm(vae.state_dict(), vae.config).items()})
    if arch == "sd1":
        ldm.update({L.SD1_CLIP_PREFIX + k: v for k, v in L.clip_to_ldm(te.state_dict()).items()})
    elif arch == "sd2":
        ldm.update({L.SD2_OPEN_CLIP_PREFIX + k: v for k, v in L.open_clip_to_ldm(te.state_dict()).items()})
    else:
        ldm.update({L.SDXL_CLIP_PREFIX + k: v for k, v in L.clip_to_ldm(te.state_dict()).items()})
        te2 = L.open_clip_to_ldm(parts["text_encoder_2"].state_dict())
        ldm.update({L.SDXL_OPEN_CLIP_PREFIX + k: v for k, v in te2.items()})
    assert sfu.infer_diffusers_model_type(ldm) == DIFFUSERS_TYPE[name]
    ckpt = sf.Checkpoint(Path(f"{name}.safetensors"), ldm, read=lambda keys: {})
    assert sf.checkpoint_architecture(ckpt) == arch

    def shapes(sd: dict) -> dict:
        return {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items()}

    assert shapes(sfu.convert_ldm_unet_checkpoint(ldm, unet.config)) == shapes(unet.state_dict())
    assert shapes(sfu.convert_ldm_vae_checkpoint(ldm, vae.config)) == shapes(vae.state_dict())
    if arch == "sd2":
        text = sfu.convert_open_clip_checkpoint(te, ldm, prefix=L.SD2_OPEN_CLIP_PREFIX)
    else:
        text = sfu.convert_ldm_clip_checkpoint(ldm)
        text.pop("text_model.embeddings.position_ids")
    assert shapes(text) == shapes(te.state_dict())
    if arch == "sdxl":
        te2 = parts["text_encoder_2"]
        converted = sfu.convert_open_clip_checkpoint(te2, ldm, prefix=L.SDXL_OPEN_CLIP_PREFIX)
        assert shapes(converted) == shapes(te2.state_dict())


def tokenizer_folders(skeletons) -> list[tuple[str, Path]]:
    return [
        (name, p.parent) for name, f in skeletons.items() for p in sorted(f.glob("tokenizer*/vocab.json"))
    ]


def test_every_skeleton_has_clips_byte_level_bpe_tokenizer(skeletons):
    """CLIP's documented behaviour: byte-level BPE with the word-end suffix </w>, 49408 tokens,
    <|startoftext|> = 49406, <|endoftext|> = 49407, 77 positions; SD2.x and SDXL's second tokenizer pad
    with "!" (id 0), SD1.x and SDXL's first with <|endoftext|>."""
    folders = tokenizer_folders(skeletons)
    assert [(n, f.name) for n, f in folders] == [
        ("sd15", "tokenizer"),
        ("sd21-base", "tokenizer"),
        ("sd21-v", "tokenizer"),
        ("sdxl-base", "tokenizer"),
        ("sdxl-base", "tokenizer_2"),
    ]
    for name, folder in folders:
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        assert len(tok) == 49408 and tok.model_max_length == 77
        assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 49406)
        assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 49407)
        assert tok.tokenize("a photo of sks dog") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
        assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
        bang = name.startswith("sd21") or folder.name == "tokenizer_2"
        assert (tok.pad_token, tok.pad_token_id) == (("!", 0) if bang else ("<|endoftext|>", 49407))
        padded = tok("a dog", padding="max_length", max_length=77).input_ids
        assert len(padded) == 77 and padded[4:] == [tok.pad_token_id] * 73


def test_generated_tokenizer_encodes_like_open_clips_simple_tokenizer(skeletons):
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tok = CLIPTokenizer.from_pretrained(skeletons["sd15"] / "tokenizer", local_files_only=True)
    for prompt in PROMPTS:
        assert tok(prompt, add_special_tokens=False).input_ids == reference.encode(prompt), prompt
    vocab, merges = sf.clip_bpe()
    assert vocab == {t: i for t, i in reference.encoder.items() if i < 49406} | {
        "<|startoftext|>": 49406,
        "<|endoftext|>": 49407,
    }
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and len(merges) == 48894  # alphabet, then alphabet</w>


def test_skeletons_are_built_once_and_deterministically(skeletons, tmp_path):
    again = sf.skeleton_dir("sdxl-base", tmp_path)
    first = skeletons["sdxl-base"]
    assert again.name == first.name  # the folder name hashes the shipped files and the BPE source
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    vocab = first / "tokenizer" / "vocab.json"
    assert vocab.stat().st_size < 2_000_000
    mtime = vocab.stat().st_mtime_ns
    assert sf.skeleton_dir("sdxl-base", tmp_path) == again and vocab.stat().st_mtime_ns == mtime
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="unknown config skeleton 'sd3'; expected one of sd15"):
        sf.skeleton_dir("sd3", tmp_path)
