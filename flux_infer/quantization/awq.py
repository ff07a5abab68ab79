"""Activation-aware weight quantization (AWQ): per-input-channel scales chosen on calibration activations.

For a group of linear layers reading the same input ``x`` (q/k/v after the input norm; gate/up after the
post-attention norm; down after the gated activation), AWQ multiplies the weights' input channels by ``s`` and
divides ``x`` by ``s`` — exact in real arithmetic — so that channels with large activations get finer
quantization. ``s = mean|x|^alpha`` (normalized); ``alpha`` is chosen on a grid by the output error of the
quantized group on the calibration activations. The division by ``s`` is folded into the preceding op: the norm's
weight, or the rows of ``up_proj`` for ``down_proj``. Then each weight is clipped: the group-wise ranges are
shrunk by the factor that minimises the output error (the second half of AWQ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from flux_infer.kernels.quant import dequantize_int4, pack_int4
from flux_infer.quantization.rtn import int4_codes

GRID = 20
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
EVAL_TOKENS = 512  # activations kept per group to score a candidate


@dataclasses.dataclass
class ScaleGroup:
    """Linear layers sharing one input, and how to divide that input by the chosen scales."""

    name: str
    linears: list[torch.nn.Linear]
    fold: Callable[[torch.Tensor], None]  # divides the producer of the input by s (applied through the recorder)
    inputs: torch.Tensor | None = None  # [tokens, in_features] float32 (subsampled)
    mean_abs: torch.Tensor | None = None  # [in_features]
    scales: torch.Tensor | None = None


def fake_quant_int4(weight: torch.Tensor, group_size: int, clip: float = 1.0) -> torch.Tensor:
    """The weight INT4 round-to-nearest would store (optionally with group ranges shrunk by ``clip``)."""
    w = weight.float()
    if clip < 1.0:
        n, k = w.shape
        grouped = w.view(n, k // group_size, group_size)
        low, high = grouped.amin(-1, keepdim=True) * clip, grouped.amax(-1, keepdim=True) * clip
        w = torch.maximum(torch.minimum(grouped, high), low).view(n, k)
    codes, scales, mins = int4_codes(w.to(weight.dtype), group_size)
    return dequantize_int4(pack_int4(codes), scales, mins, group_size, torch.float32)


def collect(groups: list[ScaleGroup]) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre-hooks on each group's first linear, keeping a subsample of its inputs and mean |x|."""
    handles = []
    for group in groups:
        def hook(module, args, group=group):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            total = x.abs().sum(0)
            group.mean_abs = total if group.mean_abs is None else group.mean_abs + total
            group.count = getattr(group, "count", 0) + x.shape[0]
            keep = x[torch.linspace(0, x.shape[0] - 1, min(EVAL_TOKENS, x.shape[0])).long()].cpu()
            group.inputs = keep if group.inputs is None else torch.cat([group.inputs, keep])[-4 * EVAL_TOKENS:]
        handles.append(group.linears[0].register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def search_scales(group: ScaleGroup, weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """The per-input-channel scales minimising the quantized output error of ``weights`` (the group's, as
    prepared so far) on the group's inputs."""
    x = group.inputs[-EVAL_TOKENS:].to(weights[0].device)
    mean_abs = (group.mean_abs / group.count).to(x.device)
    reference = [x @ w.float().T for w in weights]
    best, best_err = torch.ones_like(mean_abs), float("inf")
    for i in range(GRID):
        alpha = i / GRID
        s = mean_abs.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, reference, strict=True):
            wq = fake_quant_int4((w.float() * s).to(w.dtype), group_size) / s
            err += float((x @ wq.T - ref).pow(2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per output row, the shrink factor of its group ranges (from ``CLIP_GRID``) minimising the row's output
    error on ``x``; returns ``[out_features]`` (1.0 = no clipping)."""
    reference = x @ weight.float().T
    errors = torch.stack([(x @ fake_quant_int4(weight, group_size, c).T - reference).pow(2).mean(0)
                          for c in CLIP_GRID])  # [len(grid), out_features]
    return torch.tensor(CLIP_GRID, device=weight.device)[errors.argmin(0)]


def clip_weight(weight: torch.Tensor, group_size: int, clip: torch.Tensor) -> torch.Tensor:
    """Shrink each row's group ranges by its factor in ``clip`` ``[out_features]``."""
    n, k = weight.shape
    grouped = weight.float().view(n, k // group_size, group_size)
    factor = clip.float().view(n, 1, 1)
    low, high = grouped.amin(-1, keepdim=True) * factor, grouped.amax(-1, keepdim=True) * factor
    return torch.maximum(torch.minimum(grouped, high), low).view(n, k).to(weight.dtype)
