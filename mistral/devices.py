"""Choosing the device: the default, and one clear line for a device this machine does not have."""

from __future__ import annotations

import torch

from .errors import MistralError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device (default: cuda when a GPU is available, else cpu), or a
    MistralError naming it when it is not a device name or is not here. torch itself answers a
    missing GPU with an assertion deep inside the first copy; a user should hear it before loading."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise MistralError(f"device {device!r}: not a device name; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise MistralError(f"device {device!r}: {why}; use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise MistralError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type not in ("cpu", "meta") and not _available(resolved):
        raise MistralError(f"device {device!r}: not available here; use cpu")
    return resolved


def _available(device: torch.device) -> bool:
    backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...
    is_available = getattr(backend, "is_available", None)
    return bool(is_available()) if callable(is_available) else True
