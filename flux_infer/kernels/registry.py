"""Which implementation serves an op on a device: a compiled CUDA kernel, Triton, or the PyTorch reference."""

from __future__ import annotations

import torch

# op name -> device type -> implementation name, filled in by the modules that register device kernels
_IMPLEMENTATIONS: dict[str, dict[str, str]] = {}


def register_implementation(op: str, device_type: str, implementation_name: str) -> None:
    _IMPLEMENTATIONS.setdefault(op, {})[device_type] = implementation_name


def implementation(op: str, device: torch.device | str) -> str:
    """The implementation ``op`` dispatches to on ``device``: e.g. "cuda", "triton" or "reference"."""
    device_type = torch.device(device).type
    return _IMPLEMENTATIONS.get(op, {}).get(device_type, "reference")
