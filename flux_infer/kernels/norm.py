"""RMSNorm as ``torch.ops.flux.rms_norm``.

``weight_offset`` selects the weight convention: 0.0 is Llama's ``weight * norm(x)`` (normalized value cast to
the input dtype, then scaled), 1.0 is Gemma's ``(1 + weight) * norm(x)`` computed in float32 and cast once.
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """Reference RMSNorm over the last dimension; the same arithmetic as transformers' RMSNorm modules."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset == 0.0:
        return (weight * normed.to(x.dtype)).to(x.dtype)
    return (normed * (weight_offset + weight.float())).to(x.dtype)


@torch.library.custom_op("flux::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape, any strides)."""
    return rms_norm_ref(x, weight, eps, weight_offset)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    torch._check(weight.shape[-1] == x.shape[-1], lambda: "rms_norm: weight size must match x's last dim")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
