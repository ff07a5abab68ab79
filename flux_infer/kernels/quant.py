"""Weight-only quantized linear layers: ``torch.ops.flux.int8_linear``, ``torch.ops.flux.int4_linear`` and the gated
MLP's first half on a quantized ``[gate; up]`` weight, ``torch.ops.flux.quantized_gated_linear``.

Formats (what flux stores and its kernels read):

- INT8, per output channel, symmetric: ``qweight`` int8 ``[N, K]``, ``scale`` ``[N]``; ``w = q * scale``.
- INT4, group-wise, asymmetric: ``qweight`` int32 ``[N, K // 8]``, each int32 holding 8 consecutive input
  channels, lowest nibble first; ``scales`` and ``mins`` ``[N, K // group]``; ``w = q * scale + min`` (``min`` is
  ``-zero * scale`` of the usual zero-point form, so a group's dot product is ``scale * (x . q) + min * sum(x)``).

The references dequantize and call ``F.linear``; they are what the CPU runs and what GPU kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_infer.kernels.activation import act_mul_ref
from flux_infer.kernels.registry import KernelOp

def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, K // 8]`` -> int32 values 0..15 ``[N, K]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)  # made there: CUDA-graph safe
    return ((qweight[..., None] >> shifts) & 0xF).reshape(*qweight.shape[:-1], qweight.shape[-1] * 8)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int values 0..15 ``[N, K]`` (K a multiple of 8) -> int32 ``[N, K // 8]``."""
    v = values.to(torch.int32).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)
    out = torch.zeros(v.shape[:-1], dtype=torch.int32, device=v.device)
    for i in range(8):
        out |= v[..., i] << (4 * i)
    return out


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    q = unpack_int4(qweight).to(torch.float32)
    n, k = q.shape
    q = q.view(n, k // group_size, group_size)
    w = q * scales.to(torch.float32)[..., None] + mins.to(torch.float32)[..., None]
    return w.view(n, k).to(dtype)


def int8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype), bias)


def int4_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(qweight, scales, mins, group_size, x.dtype), bias)


@torch.library.custom_op("flux::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (qweight * scale).T + bias`` with int8 weights."""
    return int8_linear_ref(x, qweight, scale, bias)


@_int8_linear_op.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("flux::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ dequant(qweight).T + bias`` with packed group-wise int4 weights."""
    return int4_linear_ref(x, qweight, scales, mins, group_size, bias)


@_int4_linear_op.register_fake
def _(x, qweight, scales, mins, group_size, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def quantized_gated_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               mins: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                               activation: str) -> torch.Tensor:
    """A gated MLP's first half on one quantized ``[gate; up]`` weight: ``act(gate) * up``, each half rounded to
    ``x``'s dtype first, as the separate layer and ``act_mul`` produce it. INT8 when ``mins`` is None."""
    if mins is None:
        out = int8_linear_ref(x, qweight, scales, bias)
    else:
        out = int4_linear_ref(x, qweight, scales, mins, group_size, bias)
    gate, up = out.chunk(2, dim=-1)
    return act_mul_ref(gate, up, activation)


@torch.library.custom_op("flux::quantized_gated_linear", mutates_args=())
def _quantized_gated_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               mins: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                               activation: str) -> torch.Tensor:
    """``act(gate) * up`` of a quantized ``[gate; up]`` linear layer."""
    return quantized_gated_linear_ref(x, qweight, scales, mins, group_size, bias, activation)


@_quantized_gated_linear_op.register_fake
def _(x, qweight, scales, mins, group_size, bias, activation):
    torch._check(qweight.shape[0] % 2 == 0, lambda: "quantized_gated_linear: [gate; up] has an even number of rows")
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


int8_linear = KernelOp("int8_linear", _int8_linear_op, int8_linear_ref)
int4_linear = KernelOp("int4_linear", _int4_linear_op, int4_linear_ref)
quantized_gated_linear = KernelOp("quantized_gated_linear", _quantized_gated_linear_op, quantized_gated_linear_ref)
