"""The device a command runs on, checked before any model is loaded onto it."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1", "mps", ...), or cuda when present and cpu otherwise.

    Raises ValueError with a one-line message for a name torch does not know and for a device this
    machine does not have (no CUDA, or an index past the last GPU), so that a command stops before it
    loads anything instead of failing with a driver traceback halfway through.
    """
    if device is None or (isinstance(device, str) and not device.strip()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type in ("cpu", "meta"):
        return dev
    kind, asked = dev.type.upper(), f"(asked for {str(dev)!r})"
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"no {kind} device is available on this machine {asked}")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"this machine has {count} {kind} device(s) {asked}")
    return dev
