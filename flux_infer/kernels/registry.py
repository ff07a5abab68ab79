"""``KernelOp``: one op, its reference, its device kernels, and how flux code calls it.

Every op is a ``torch.library`` custom op (``torch.ops.flux.<name>``) so ``torch.compile`` and ``opcheck`` see
one opaque node with a fake implementation. Calling through the dispatcher costs tens of microseconds of
Python per call, so flux's own eager code calls ``KernelOp.__call__``, which goes straight to the device's kernel
(or the reference) and uses the custom op only while ``torch.compile`` traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_OPS: dict[str, KernelOp] = {}


class KernelOp:
    def __init__(self, name: str, custom_op: Any, reference: Callable[..., Any]) -> None:
        self.name = name
        self.custom_op = custom_op
        self.reference = reference
        self._kernels: dict[str, tuple[Callable[..., Any], str]] = {}
        _OPS[name] = self

    def register(self, device_type: str, kernel: Callable[..., Any], implementation_name: str) -> None:
        """Serve ``device_type`` with ``kernel`` (same signature as the reference), also inside the custom op."""
        self._kernels[device_type] = (kernel, implementation_name)
        self.custom_op.register_kernel(device_type)(kernel)

    def implementation(self, device: torch.device | str) -> str:
        entry = self._kernels.get(torch.device(device).type)
        return entry[1] if entry else "reference"

    def native(self, device: torch.device) -> bool:
        return device.type in self._kernels

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.custom_op(*args)
        entry = self._kernels.get(args[0].device.type)
        return (entry[0] if entry else self.reference)(*args)


def implementation(op: str, device: torch.device | str) -> str:
    """The implementation ``op`` runs on ``device``: e.g. "cuda", "triton" or "reference"."""
    return _OPS[op].implementation(device) if op in _OPS else "reference"
