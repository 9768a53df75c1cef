"""Data-parallel training: two CPU processes (torchrun + gloo), as `accelerate launch` runs them on GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nblora_diffusion import diffusion
from nblora_diffusion.core import nblora_layers
from nblora_diffusion.core.bounds import matrix_schatten_norm
from nblora_diffusion.testing import tiny_sd_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_training_with_the_default_spectral_bound(tmp_path):
    """p = inf (the default) leaves s̃ without influence; DDP still needs it in the graph."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "train_dreambooth.py"), "--demo", "--output_dir", str(out), "--max_train_steps", "2"]
    cmd += ["--norm_p", "inf", "--norm_bound", "0.5", "--pretrained_model_name_or_path", str(tiny_sd_path())]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # gloo on CPU
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel training on 2 processes (MULTI_CPU)" in done.stderr
    assert done.stdout.count("training finished at step 2") == 1  # one report, from rank 0

    pipe = diffusion.load_pipeline(tiny_sd_path())
    info = diffusion.load_adapter(pipe, out)
    assert info["global_step"] == 2
    for _, layer in nblora_layers(pipe.unet):
        with torch.no_grad():
            assert float(matrix_schatten_norm(layer.delta_weight().double(), layer.p)) <= 0.5 * (1 + 1e-6)
