"""Which tool each exported LoRA file is for, as the app's Downloads and the trainer's report say it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from nblora_diffusion.app_logic.generation import DIFFUSERS_FILE, download_guide
from nblora_diffusion.training.outputs import KOHYA_FILE

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_dreambooth", ROOT / "train_dreambooth.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def line_of(text: str, name: str) -> str:
    (line,) = [s for s in text.splitlines() if name in s]
    return line


def test_download_guide_names_the_tool_of_each_file_in_the_download_order():
    guide = download_guide()
    assert [line.split("`")[1] for line in guide.splitlines()] == [
        "NAME-nblora.zip",
        DIFFUSERS_FILE,
        "NAME-kohya.safetensors",
    ]  # prepare_downloads' order
    kohya = line_of(guide, "-kohya.safetensors")
    assert all(tool in kohya for tool in ("AUTOMATIC1111", "ComfyUI", "Forge"))
    diffusers = line_of(guide, DIFFUSERS_FILE)
    assert "diffusers" in diffusers and "PEFT" in diffusers and "not for ComfyUI" in diffusers


def test_train_report_names_the_tool_of_each_lora_file(tmp_path, capsys):
    for name in (DIFFUSERS_FILE, KOHYA_FILE, "nblora_config.json"):
        (tmp_path / name).write_text("")
    result = SimpleNamespace(output_dir=tmp_path, stopped=False, final_step=3, last_checkpoint=None)
    cli.report(SimpleNamespace(logging_dir="logs"), result, builtin_model=False)
    out = capsys.readouterr().out
    kohya = line_of(out, KOHYA_FILE)
    assert all(tool in kohya for tool in ("AUTOMATIC1111", "ComfyUI", "Forge"))
    diffusers = line_of(out, DIFFUSERS_FILE)
    assert "diffusers" in diffusers and "PEFT" in diffusers and "ComfyUI" not in diffusers
