"""resolve_device: the device a command runs on, or a one-line error before anything is loaded."""

import pytest
import torch

from nblora_diffusion.devices import resolve_device


def test_the_default_is_cuda_when_present_else_cpu(monkeypatch):
    for present, expected in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda present=present: present)
        assert resolve_device(None) == resolve_device("") == torch.device(expected)
    assert resolve_device(" cpu ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu0", "Cuda"])
def test_an_unknown_name_is_a_one_line_error(name):
    with pytest.raises(ValueError, match=r"^unknown device .* \(e\.g\. cpu, cuda, cuda:1\)$"):
        resolve_device(name)


def test_a_device_this_machine_lacks_is_an_error_and_an_existing_one_is_returned(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"^no CUDA device is available on this machine \(asked for 'cuda:1'\)$"
    ):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == resolve_device(1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^this machine has 2 CUDA device\(s\) \(asked for 'cuda:2'\)$"):
        resolve_device("cuda:2")
