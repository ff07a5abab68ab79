"""Round-to-nearest quantization into flux's formats (see ``flux_infer.kernels.quant``)."""

from __future__ import annotations

import torch

from flux_infer.config import SUPPORTED_GROUP_SIZES
from flux_infer.kernels.quant import pack_int4


def choose_group_size(in_features: int, requested: int) -> int | None:
    """``requested`` if it divides ``in_features``, else the largest smaller supported size that does.

    SmolLM2's hidden size 576 is not a multiple of 128: its layers get 64. None means no supported size fits
    (the layer stays in full precision, and the report says so).
    """
    for size in sorted((g for g in SUPPORTED_GROUP_SIZES if g <= requested), reverse=True):
        if in_features % size == 0:
            return size
    return None


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric INT8: ``(qweight int8 [N, K], scale [N])`` in the weight's dtype."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def int4_codes(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric INT4 of ``weight`` ``[N, K]``: ``(codes 0..15 [N, K], scales, mins [N, K // g])``
    with ``w ~ code * scale + min``; scales and mins are rounded to the weight's dtype before the codes are
    chosen, so the codes are the best ones for the stored scales."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15.0).clamp(min=1e-10).to(weight.dtype).float()
    zero = torch.round(-low / scale).clamp_(0, 15)
    mins = (-zero * scale).to(weight.dtype).float()
    codes = torch.round((w - mins[..., None]) / scale[..., None]).clamp_(0, 15)
    return codes.view(n, k).to(torch.int32), scale.to(weight.dtype), mins.to(weight.dtype)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qweight int32 [N, K // 8], scales [N, K // g], mins [N, K // g])``."""
    codes, scales, mins = int4_codes(weight, group_size)
    return pack_int4(codes), scales, mins


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    ref = reference.detach().float()
    noise = (ref - approximation.detach().float()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-30)))
