import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session", autouse=True)
def _scratch_under_basetemp(tmp_path_factory):
    """The libraries' scratch files (gradio's upload cache, the empty folders gradio_client downloads
    through, torchrun's logs) go under pytest's base temp, which pytest prunes, not into /tmp for good.
    Inductor's cache stays where it is, shared by the workers."""
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    names = ("TMPDIR", "GRADIO_TEMP_DIR", "TORCHINDUCTOR_CACHE_DIR")
    saved, saved_tempdir = {k: os.environ.get(k) for k in names}, tempfile.tempdir
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    scratch = tmp_path_factory.mktemp("scratch")
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    os.environ["GRADIO_TEMP_DIR"] = str(scratch / "gradio")
    yield
    tempfile.tempdir = saved_tempdir
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same global RNG state (layers draw their init from it), so a test's
    numbers do not depend on which tests ran before it."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate fixes --mixed_precision once per process (train() refuses another one, as a user's process
    would): each test starts without that state, as accelerate's own test case resets it between tests."""
    import sys

    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, is_initialized

        if is_initialized():
            AcceleratorState._reset_state(True)


def load_example(name: str):
    """Import examples/<name>.py as a module (the examples are scripts, not a package), with examples/ on the
    path as running the script puts it (for their shared example_utils)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{name}_example", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def quick_example(name: str, tmp_path_factory, *flags: str):
    """examples/<name>.py run with --quick (and ``flags``) into a fresh folder: (its results, the folder)."""
    out = tmp_path_factory.mktemp(name)
    return load_example(name).main(["--quick", *flags, "--out", str(out)]), out


@pytest.fixture
def cayley_calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Records (L, q, r) of every group of Cayley transforms the layers and the batched pass run."""
    import importlib

    cayley_module, stacks = (
        importlib.import_module(f"nblora_diffusion.core.{n}") for n in ("cayley", "stacks")
    )

    calls: list[tuple[int, int, int]] = []
    original = cayley_module.cayley_transposed_groups

    def counted(groups, **kwargs):
        for blocks in groups:
            L = blocks[0].shape[0] if blocks[0].dim() == 3 else 1
            calls.append((L, sum(b.shape[-1] for b in blocks), blocks[0].shape[-2]))
        return original(groups, **kwargs)

    monkeypatch.setattr(stacks, "cayley_transposed_groups", counted)  # the one caller (stacked_factors)
    return calls


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (much faster on a shared CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random LLaMA saved in the transformers format."""
    from nblora_diffusion.transformer_models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny random ViT saved in the transformers format."""
    from nblora_diffusion.transformer_models.tiny import make_tiny_vit

    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "model")
