"""Adapter folders, the norm-bound slider, merging, dtypes and bad inputs on tiny SD / SDXL pipelines."""

import json

import pytest
import torch

from nblora_diffusion.core import matrix_schatten_norm, nblora_layers
from nblora_diffusion.diffusion import (
    add_nblora,
    get_norm_bound,
    load_adapter,
    load_pipeline,
    make_config,
    merge_adapter,
    read_adapter_config,
    remove_adapter,
    save_adapter,
    set_norm_bound,
    unmerge_adapter,
)
from nblora_diffusion.testing import tiny_sd_path

from sd_helpers import PROMPT, assert_images_close, images, perturb


def adapted(sdxl: bool = False, dtype=torch.float32, unet_delta: float = 0.5):
    pipe = load_pipeline(tiny_sd_path(sdxl=sdxl), dtype=dtype)
    add_nblora(
        pipe, make_config(4, "inf", delta=unet_delta), make_config(2, 2, delta=0.3, component="text_encoder")
    )
    perturb(pipe)
    return pipe


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_save_then_load_gives_identical_images(tmp_path, sdxl):
    pipe = adapted(sdxl)
    expected = images(pipe)
    folder = save_adapter(pipe, tmp_path / "adapter", base_model="tiny", token="sks", instance_prompt=PROMPT)
    info = read_adapter_config(folder)
    assert info["architecture"] == ("sdxl" if sdxl else "sd1") and info["token"] == "sks"
    assert (info["rank"], info["p"], info["delta"], info["parameterization"]) == (4, "inf", 0.5, "II")
    assert info["targets"] == ["to_q", "to_k", "to_v", "to_out.0"] and info["instance_prompt"] == PROMPT
    comps = {"unet", "text_encoder"} | ({"text_encoder_2"} if sdxl else set())
    assert set(info["components"]) == comps
    fresh = load_pipeline(tiny_sd_path(sdxl=sdxl))
    assert load_adapter(fresh, folder)["base_model"] == "tiny"
    assert torch.equal(images(fresh), expected)
    # loading into a pipeline that already has the same adapters overwrites their weights
    other = adapted(sdxl)
    perturb(other, seed=7)
    load_adapter(other, folder)
    assert torch.equal(images(other), expected)


def test_slider_is_exact_at_0_and_1_monotone_and_reversible():
    pipe = load_pipeline(tiny_sd_path())
    base = images(pipe)
    add_nblora(pipe, make_config(4, "inf", delta=0.5), make_config(2, 2, delta=0.3, component="text_encoder"))
    perturb(pipe)
    full = images(pipe)
    dist = {}
    for scale in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        set_norm_bound(pipe, scale=scale)
        dist[scale] = float((images(pipe) - base).abs().mean())
    assert dist[0.0] == 0.0
    values = list(dist.values())
    assert all(a < b for a, b in zip(values[:-1], values[1:], strict=True))
    set_norm_bound(pipe, scale=1.0)
    assert torch.equal(images(pipe), full)  # back to the trained adapter exactly
    set_norm_bound(pipe, delta_prime=0.25)  # δ' = δ/2 is scale 1/2, for every component
    assert get_norm_bound(pipe)["scale"] == 0.5
    with torch.no_grad():
        for _, layer in nblora_layers(pipe.unet):  # every singular value scales: ‖W‖_S∞ <= δ'
            assert float(matrix_schatten_norm(layer.delta_weight(), float("inf"))) <= 0.25 * (1 + 1e-5)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_merged_equals_unmerged_and_slider_works_while_merged(dtype):
    pipe = load_pipeline(tiny_sd_path(), dtype=dtype)
    base = images(pipe)
    add_nblora(pipe, make_config(4, "inf", delta=0.5), make_config(2, 2, delta=0.3, component="text_encoder"))
    assert torch.equal(images(pipe), base)
    perturb(pipe)
    unmerged = images(pipe)
    set_norm_bound(pipe, scale=0.5)
    half = images(pipe)
    set_norm_bound(pipe, scale=1.0)
    merge_adapter(pipe)
    assert get_norm_bound(pipe)["merged"]
    assert_images_close(images(pipe), unmerged, dtype)
    set_norm_bound(pipe, scale=0.5)
    assert_images_close(images(pipe), half, dtype)
    # fp16/bf16 merges keep the base weights: exact; fp32 subtracts the update again (error ~1e-7)
    exact = 0.0 if dtype != torch.float32 else 1e-5
    set_norm_bound(pipe, scale=0.0)  # merged and at 0: the base model
    assert (images(pipe) - base).abs().max() <= exact
    set_norm_bound(pipe, scale=1.0)
    unmerge_adapter(pipe)
    assert (images(pipe) - unmerged).abs().max() <= exact
    remove_adapter(pipe)
    assert (images(pipe) - base).abs().max() <= exact


def test_adapter_folder_for_another_architecture_is_refused_and_pipeline_untouched(tmp_path):
    folder = save_adapter(adapted(sdxl=True), tmp_path / "xl", base_model="tiny-xl")
    pipe = load_pipeline(tiny_sd_path())
    with pytest.raises(ValueError, match="trained for sdxl, the pipeline is sd1"):
        load_adapter(pipe, folder)
    assert not list(nblora_layers(pipe.unet))


def test_missing_or_corrupt_adapter_files_give_clear_errors_and_leave_pipeline_untouched(tmp_path):
    folder = save_adapter(adapted(), tmp_path / "a", base_model="tiny")
    pipe = load_pipeline(tiny_sd_path())
    with pytest.raises(ValueError, match="adapter folder not found"):
        load_adapter(pipe, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nblora_config.json is missing"):
        load_adapter(pipe, tmp_path)
    te_file = folder / "nblora_text_encoder.safetensors"
    data = te_file.read_bytes()
    te_file.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_adapter(pipe, folder)
    te_file.unlink()
    with pytest.raises(ValueError, match="NB-LoRA file not found"):
        load_adapter(pipe, folder)
    assert not list(nblora_layers(pipe.unet)) and not list(nblora_layers(pipe.text_encoder))
    (folder / "nblora_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(pipe, folder)


def test_wrong_dtype_or_shape_in_adapter_file_is_refused_and_rolled_back(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_adapter(adapted(), tmp_path / "a", base_model="tiny")
    te_file = folder / "nblora_text_encoder.safetensors"
    tensors = load_file(te_file)
    meta = __import__("safetensors").safe_open(str(te_file), "pt").metadata()
    key = next(iter(tensors))
    save_file({**tensors, key: tensors[key].to(torch.int32)}, te_file, metadata=meta)
    pipe = load_pipeline(tiny_sd_path())
    with pytest.raises(ValueError, match="floating-point"):
        load_adapter(pipe, folder)
    assert not list(nblora_layers(pipe.unet)) and not list(nblora_layers(pipe.text_encoder))
    # a pipeline whose adapters have another rank: the shapes do not fit, its weights stay as they were
    other = load_pipeline(tiny_sd_path())
    add_nblora(
        other, make_config(8, "inf", delta=0.5), make_config(2, 2, delta=0.3, component="text_encoder")
    )
    perturb(other)
    before = images(other)
    save_file(tensors, te_file, metadata=meta)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(other, folder)
    assert torch.equal(images(other), before)


def test_bad_arguments_give_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError, match="model path not found"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="dtype must be"):
        load_pipeline(tiny_sd_path(), dtype=torch.int8)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="supported are"):
        load_pipeline(tmp_path)
    pipe = load_pipeline(tiny_sd_path(), dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        save_adapter(pipe, tmp_path / "x", base_model="tiny")
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        set_norm_bound(pipe, scale=0.5)
    add_nblora(pipe, make_config(4, "inf", delta=0.5))
    with pytest.raises(ValueError, match="exactly one of"):
        set_norm_bound(pipe)
    with pytest.raises(ValueError, match=">= 0"):
        set_norm_bound(pipe, scale=-1.0)
    with pytest.raises(ValueError, match="reserved"):
        save_adapter(pipe, tmp_path / "x", base_model="tiny", rank=3)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_adapter(pipe, tmp_path / "x", base_model="tiny", note=object())
    assert not (tmp_path / "x").exists()  # nothing half-written
    relative = load_pipeline(tiny_sd_path())
    add_nblora(relative, make_config(4, 2, gamma=0.1))
    with pytest.raises(ValueError, match="scale="):
        set_norm_bound(relative, delta_prime=0.1)


def test_loading_under_inference_mode_and_replacing_other_adapters(tmp_path):
    source = adapted()
    expected = images(source)
    folder = save_adapter(source, tmp_path / "a", base_model="tiny")
    pipe = load_pipeline(tiny_sd_path())
    add_nblora(pipe, make_config(8, 2, delta=0.1))  # another adapter already in place
    with pytest.raises(ValueError, match="remove_adapter"):
        load_adapter(pipe, folder)
    remove_adapter(pipe)
    with torch.inference_mode():  # adapter parameters must still be normal tensors (cache keys, training)
        load_adapter(pipe, folder)
    assert torch.equal(images(pipe), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_pipeline_adapter_round_trip(tmp_path, dtype):
    pipe = load_pipeline(tiny_sd_path(), dtype=dtype, device="cuda")
    base = images(pipe)
    add_nblora(pipe, make_config(4, "inf", delta=0.5), make_config(2, 2, delta=0.3, component="text_encoder"))
    assert torch.equal(images(pipe), base)
    perturb(pipe)
    unmerged = images(pipe)
    folder = save_adapter(pipe, tmp_path / "a", base_model="tiny")
    merge_adapter(pipe)
    assert (images(pipe) - unmerged).abs().max() <= 5e-2
    set_norm_bound(pipe, scale=0.0)
    assert torch.equal(images(pipe), base)
    fresh = load_pipeline(tiny_sd_path(), dtype=dtype, device="cuda")
    load_adapter(fresh, folder)
    assert torch.equal(images(fresh), unmerged)
