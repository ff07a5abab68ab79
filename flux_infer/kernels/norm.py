"""RMSNorm as ``torch.ops.flux.rms_norm`` and the residual-add variant ``torch.ops.flux.add_rms_norm``.

``weight_offset`` selects the weight convention: 0.0 is Llama's ``weight * norm(x)`` (normalized value cast to
the input dtype, then scaled), 1.0 is Gemma's ``(1 + weight) * norm(x)`` computed in float32 and cast once.
"""

from __future__ import annotations

import torch

from flux_infer.kernels.registry import KernelOp


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """Reference RMSNorm over the last dimension; the same arithmetic as transformers' RMSNorm modules."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset == 0.0:
        return (weight * normed.to(x.dtype)).to(x.dtype)
    return (normed * (weight_offset + weight.float())).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = residual + x``; returns ``(rms_norm(r), r)``: a decoder layer's residual add and the next norm."""
    summed = residual + x
    return rms_norm_ref(summed, weight, eps, weight_offset), summed


@torch.library.custom_op("flux::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape, any strides)."""
    return rms_norm_ref(x, weight, eps, weight_offset)


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    torch._check(weight.shape[-1] == x.shape[-1], lambda: "rms_norm: weight size must match x's last dim")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("flux::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)`` in one pass."""
    return add_rms_norm_ref(x, residual, weight, eps, weight_offset)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, weight_offset):
    torch._check(x.shape == residual.shape, lambda: "add_rms_norm: x and residual must have the same shape")
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


rms_norm = KernelOp("rms_norm", _rms_norm_op, rms_norm_ref)
add_rms_norm = KernelOp("add_rms_norm", _add_rms_norm_op, add_rms_norm_ref)
