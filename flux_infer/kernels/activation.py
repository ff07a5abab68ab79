"""Gated activations as ``torch.ops.flux.act_mul``: ``act(gate) * up`` in one pass (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_infer.kernels.registry import KernelOp

ACTIVATIONS = ("silu", "gelu_tanh")


def act_mul_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Reference: ``act(gate) * up`` with transformers' SiLU or tanh-approximated GELU."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


@torch.library.custom_op("flux::act_mul", mutates_args=())
def _act_mul_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up``; ``gate`` and ``up`` have the same shape (they may be strided views of one tensor)."""
    return act_mul_ref(gate, up, activation)


@_act_mul_op.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    torch._check(gate.shape == up.shape, lambda: "act_mul: gate and up must have the same shape")
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


act_mul = KernelOp("act_mul", _act_mul_op, act_mul_ref)
