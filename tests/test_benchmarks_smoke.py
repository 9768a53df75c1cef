"""The benchmarks still run end to end against the current core (tiny timing budget)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def cayley_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their shared `common` module
    for name in ("common", "cayley_bench"):
        sys.modules.pop(name, None)
    return importlib.import_module("cayley_bench")


def test_cayley_bench_prints_every_ratio_for_the_sd15_shapes(cayley_bench, capsys):
    assert cayley_bench.main(["--ranks", "2", "--repeats", "1", "--min-time", "0.01", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "128 adapters in 6 groups" in out
    times_row, ops_row = [line for line in out.splitlines() if line.startswith("| 2 |")]
    cells = times_row.strip("|").split("|")[1:]
    ratios = [
        float(x) for cell in cells for x in cell.replace("x", " ").replace("(", " ").replace(")", " ").split()
    ]
    assert len(ratios) == 9 and all(math.isfinite(v) for v in ratios)
    # ratios of two timings are > 0; the two "net of consumer" ones subtract a timing of the same size and can
    # go either way when a loaded machine makes one 10 ms measurement noisy
    assert all(v > 0 for i, v in enumerate(ratios) if i not in (5, 8)), ratios
    # batching dispatches far fewer ops (kernel launches on a GPU) than one Cayley per layer
    assert all(float(cell.split("=")[1].strip(" x")) > 5 for cell in ops_row.strip("|").split("|")[1:])


@pytest.mark.parametrize(
    "name", ["cayley_bench", "compile_bench", "inference_bench", "metrics_bench", "train_step_bench"]
)
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "gpu"])
def test_a_device_this_machine_lacks_is_a_one_line_error(name, device, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for module in ("common", name):
        sys.modules.pop(module, None)
    bench = importlib.import_module(name)
    capsys.readouterr()  # torch.utils.benchmark's import warns that no CUDA runtime is found
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", device])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device: ") and "\n" not in err, err
    assert ("unknown device" if device == "gpu" else "no CUDA device") in err
