"""examples/llama_trainer_smoke.py: a tiny LLaMA fine-tuned with NB-LoRA through the transformers Trainer."""

from __future__ import annotations

import pytest
from conftest import load_example, quick_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    # bf16 autocast and gradient checkpointing: the Trainer features the example demonstrates
    results, _ = quick_example("llama_trainer_smoke", tmp_path_factory, "--bf16", "--gradient_checkpointing")
    return results


def test_trainer_fine_tuning_learns_the_counting_task(quick):
    assert quick["bf16"] and quick["gradient_checkpointing"]
    assert quick["replaced_modules"] == 7 * 2 + 1  # llama preset over 2 blocks, plus lm_head
    assert quick["trainable_params"] < 0.5 * quick["total_params"]
    losses = quick["losses"]
    assert losses[-1] < 0.8 * losses[0]
    assert quick["next_token_acc_after"] > quick["next_token_acc_before"] + 0.2


def test_every_trainer_checkpoint_holds_a_loadable_adapter(quick):
    assert quick["checkpoints"] and quick["checkpoint_has_adapter"]


def test_native_reload_and_peft_export_reproduce_the_trained_logits(quick):
    assert quick["native_reload_max_abs_diff"] <= 1e-6
    assert quick["peft_max_abs_diff"] <= 1e-6


def test_bad_bound_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("llama_trainer_smoke").main(["--quick", "--delta", "-1"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "delta" in err and err.count("\n") == 1
