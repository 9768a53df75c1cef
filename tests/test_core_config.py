"""NBLoRAConfig: bad values are one-line errors naming the value; the config round-trips through a dict."""

from __future__ import annotations

import math

import pytest

from nblora_diffusion import NBLoRAConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "got 0"),
        ({"p": 0.9}, "got 0.9"),
        ({"delta": 0}, "got 0"),
        ({"delta": -2.5}, "got -2.5"),
        ({"delta": None}, "exactly one of delta and gamma"),
        ({"gamma": 0.1}, "exactly one of delta and gamma"),
        ({"target_modules": ()}, r"got \(\)"),
        ({"parameterization": "2"}, "got '2'"),
        ({"dropout": -0.1}, "got -0.1"),
    ],
)
def test_bad_config_raises_value_error_naming_the_value(kwargs, message):
    args = {"rank": 2, "p": 2.0, "delta": 1.0, "target_modules": ("to_q",)} | kwargs
    with pytest.raises(ValueError, match=message):
        NBLoRAConfig(**args)


def test_config_round_trips_through_a_dict():
    config = NBLoRAConfig(rank=3, p="infinity", gamma=0.2, target_modules=["to_q"], parameterization="I")
    assert config.p == math.inf and config.target_modules == ("to_q",)
    assert NBLoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown NB-LoRA config keys"):
        NBLoRAConfig.from_dict(config.to_dict() | {"alpha": 1})
