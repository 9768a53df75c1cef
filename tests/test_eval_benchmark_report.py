"""The benchmark report end to end: `python -m eval benchmark` on the tiny SD with LoRA and NB-LoRA at two δ,
`--sweep_delta` and drift among the metrics; the drift-vs-δ and sweep plots (what they draw, read from the
figures) and the PEFT-shaped result files (checked against the keys of PEFT's own results)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import eval.tables
from eval.cli import main
from eval.peft_results import count_parameters
from nblora_diffusion.testing.metric_models import metric_models_path
from nblora_diffusion.testing.tiny_sd import tiny_sd_path

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "assets" / "dreambooth"
SWEEP = (0.0, 0.5, 1.0)
METHODS = {
    "train": {"max_train_steps": 2, "checkpointing_steps": 2, "learning_rate": 0.01, "seed": 0,
              "report_to": "none", "resolution": 32, "rank": 4},
    "methods": [
        {"id": "lora_r4", "name": "LoRA r=4", "adapter": "lora"},
        {"id": "nb_d0.5", "name": "NB-LoRA δ=0.5", "adapter": "nblora", "norm_p": "2", "norm_bound": 0.5},
        {"id": "nb_d1", "name": "NB-LoRA δ=1", "adapter": "nblora", "norm_p": "2", "norm_bound": 1.0},
    ],
}  # fmt: skip
NB = {"nb_d0.5": 0.5, "nb_d1": 1.0}  # the NB-LoRA methods by ascending δ

# The keys of huggingface/peft method_comparison/image-gen/results/*.json (utils.log_results), per part
PEFT_KEYS = {
    "run_info": {"created_at", "total_time", "experiment_name", "peft_branch", "train_config", "peft_config",
                 "error_msg"},
    "train_info": {"accelerator_memory_reserved_avg", "accelerator_memory_max",
                   "accelerator_memory_reserved_99th", "train_time", "file_size", "num_trainable_params",
                   "num_total_params", "status", "metrics"},
    "meta_info": {"model_info", "dataset_info", "package_info", "system_info", "pytorch_info"},
}  # fmt: skip
PEFT_PACKAGE_KEYS = {f"{p}-{k}" for p in ("transformers", "peft", "datasets", "diffusers", "torch")
                     for k in ("version", "commit-hash")}  # fmt: skip
PEFT_SYSTEM_KEYS = {"system", "release", "version", "machine", "processor", "accelerator"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_thread):
    """One benchmark run (subject dog, 3 methods, 2 steps, 2 prompts x 1 image at 32 px), its figures
    recorded as they are saved: file name -> [(line label, [(x, y), ...])]."""
    root = tmp_path_factory.mktemp("bench")
    methods = root / "methods.json"
    methods.write_text(json.dumps(METHODS))
    m = metric_models_path()
    args = ["benchmark", "--protocol", "peft-image-gen", "--metrics", "dino,clip_t,drift",
            "--drift_prompts", "eval", "--dataset", str(DATASET), "--subjects", "dog",
            "--base_model", str(tiny_sd_path()), "--methods", str(methods), "--out", str(root / "out"),
            "--max_prompts", "2", "--images_per_prompt", "1", "--num_inference_steps", "2",
            "--resolution", "32", "--dino_model", str(m.dino), "--clip_model", str(m.clip),
            "--sweep_delta", ",".join(f"{d:g}" for d in SWEEP), "--no_save_images"]  # fmt: skip
    figures: dict[str, list] = {}
    save = eval.tables.save_figure

    def record(fig, path):
        figures[Path(path).name] = [
            (line.get_label(), [tuple(map(float, xy)) for xy in line.get_xydata()])
            for line in fig.axes[0].lines
        ]
        return save(fig, path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval.tables, "save_figure", record)
        assert main(args) == 0
    out = root / "out"
    return out, json.loads((out / "report" / "results.json").read_text()), figures


def _same_points(got, want):
    """A plotted line's (x, y) points are these values, in this order (the floats of results.json)."""
    assert np.shape(got) == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def _method(results, method_id):
    return next(x for x in results["methods"] if x["id"] == method_id)


def _final(x):
    return x["steps"][str(max(int(k) for k in x["steps"]))]


def test_sweep_is_sorted_and_delta_zero_is_the_base_model(bench):
    _, results, _ = bench
    assert results["metrics"] == ["dino", "clip_t", "drift"]
    assert "sweep" not in _method(results, "lora_r4")
    for method_id, delta in NB.items():
        x = _method(results, method_id)
        assert list(x["sweep"]) == [f"{d:g}" for d in SWEEP]  # every δ', ascending
        assert x["sweep"]["0"]["drift"]["mean"] == pytest.approx(0.0, abs=1e-9)  # δ' = 0: the base model
        trained = _final(x)
        assert trained["drift"]["mean"] > 1e-6  # the adapter did move the images away
        assert x["sweep"][f"{delta:g}"] == trained  # δ' = δ: the adapter as trained, same numbers
        rows = [r["row"] for r in results["table"] if r["method_id"] == method_id]
        assert rows == ["step 2", *(f"δ'={d:g} (slider)" for d in SWEEP)]


def test_drift_plot_draws_each_slider_and_the_trained_points_by_delta(bench):
    out, results, figures = bench
    assert (out / "report" / "drift_vs_delta.png").stat().st_size > 1000
    lines = dict(figures["drift_vs_delta.png"])
    for method_id in NB:
        x = _method(results, method_id)
        want = [(d, x["sweep"][f"{d:g}"]["drift"]["mean"]) for d in SWEEP]
        _same_points(lines[f"{x['name']}, slider δ'"], want)
    trained = [(d, _final(_method(results, i))["drift"]["mean"]) for i, d in NB.items()]
    _same_points(lines["trained at δ, p=2"], trained)  # both NB-LoRA methods, ascending δ
    assert not any("LoRA r=4" in label for label in lines)  # LoRA has no δ


def test_sweep_plot_puts_the_trained_adapters_beside_the_slider_curve(bench):
    out, results, figures = bench
    assert (out / "report" / "sweep_dino_clip_t.png").stat().st_size > 1000
    lines = dict(figures["sweep_dino_clip_t.png"])
    for method_id in NB:
        x = _method(results, method_id)
        points = [x["sweep"][f"{d:g}"] for d in SWEEP]
        curve = [(v["clip_t"]["mean"], v["dino"]["mean"]) for v in points]
        _same_points(lines[f"{x['name']} slider δ'"], curve)  # (CLIP-T, DINO) in δ' order
        final = _final(x)
        star = [(final["clip_t"]["mean"], final["dino"]["mean"])]
        _same_points(lines[f"{x['name']} (trained)"], star)


def test_peft_result_files_have_peft_keys_and_the_units_numbers(bench):
    out, results, _ = bench
    unet = count_parameters(sorted((tiny_sd_path() / "unet").glob("*.safetensors")))
    for method in METHODS["methods"]:
        path = out / "peft_results" / f"{method['id']}--dog.json"
        result = json.loads(path.read_text())
        assert set(result) == set(PEFT_KEYS)
        for part, keys in PEFT_KEYS.items():
            assert keys <= set(result[part]), (part, keys - set(result[part]))
        meta = result["meta_info"]
        assert PEFT_PACKAGE_KEYS <= set(meta["package_info"]) and PEFT_SYSTEM_KEYS <= set(meta["system_info"])
        assert set(meta["model_info"]) == set(meta["dataset_info"]) == {"sha", "created_at"}
        assert isinstance(meta["pytorch_info"], str) and meta["pytorch_info"]
        info, run = result["train_info"], out / "runs" / method["id"] / "dog"
        files = sorted(run.glob("nblora_*.safetensors")) or [run / "pytorch_lora_weights.safetensors"]
        assert info["status"] == "success" and info["train_time"] > 0
        assert info["file_size"] == sum(f.stat().st_size for f in files)
        assert info["num_trainable_params"] == count_parameters(files) > 0
        assert info["num_total_params"] == unet + info["num_trainable_params"]
        assert result["run_info"]["experiment_name"] == f"{method['id']}/dog"
        assert result["run_info"]["train_config"]["output_dir"] == str(run)
        # one entry per trained step, the slider rows left out; PEFT's names under --protocol peft-image-gen
        (last,) = info["metrics"]
        final = _final(_method(results, method["id"]))
        assert last["step"] == 2
        assert last["test dino_similarity"] == pytest.approx(final["dino"]["mean"])
        assert last["drift"] == pytest.approx(final["drift"]["mean"])
        assert not math.isnan(last["clip_t"])
