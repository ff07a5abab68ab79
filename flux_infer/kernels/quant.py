"""Weight-only quantized linear layers: ``torch.ops.flux.int8_linear``, ``torch.ops.flux.int4_linear`` and the gated
MLP's first half on a quantized ``[gate; up]`` weight, ``torch.ops.flux.quantized_gated_linear``; and the INT4 layers
around an RMSNorm that let a decode step run without norm kernels (``int4_linear_add_norm`` before the norm,
``int4_linear_norm_scaled`` after it).

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


# ---- INT4 layers around an RMSNorm (Llama-style: weight * x * rsqrt(mean(x^2) + eps)) -------------------------
# A norm between two quantized layers is split between them: the layer before it adds the residual, writes
# h * weight and leaves sums of squares of h per row (``partials``, float32 ``[..., slots]``, summed over the last
# dim: the CUDA kernel writes one slot per block); the layer after it takes h * weight as its input and multiplies
# its float32 sums by the row's rsqrt(sum(partials) / width + eps) before the bias. The norm's scale commutes with
# the linear layer, so the result is the norm and the layer up to rounding (the separate path rounds the
# normalized activations to 16 bits first): a lossy path's arithmetic, not the unfused path's bits.


def norm_partial_slots(out_features: int) -> int:
    """Slots per row of ``int4_linear_add_norm``'s sums of squares: one per kernel block, >= 15 outputs each."""
    return -(-out_features // 15)


def int4_linear_add_norm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                             group_size: int, bias: torch.Tensor | None, residual: torch.Tensor,
                             norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h * norm_weight, h, partials)`` with ``h = residual + int4_linear(x)`` (rounded as the layer and the add
    round it) and ``partials`` summing to ``sum(h^2)`` per row (slot 0 here)."""
    h = residual + int4_linear_ref(x, qweight, scales, mins, group_size, bias)
    hf = h.float()
    partials = hf.new_zeros((*h.shape[:-1], norm_partial_slots(h.shape[-1])))
    partials[..., 0] = hf.pow(2).sum(-1)
    return (hf * norm_weight.float()).to(h.dtype), h, partials


def rms_scale(partials: torch.Tensor, width: int, eps: float) -> torch.Tensor:
    """float32 ``[..., 1]``: the RMSNorm scale rsqrt(mean(h^2) + eps) of rows whose squares ``partials`` hold."""
    return torch.rsqrt(partials.float().sum(-1, keepdim=True) / width + eps)


def int4_linear_norm_scaled_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                                group_size: int, bias: torch.Tensor | None, partials: torch.Tensor,
                                eps: float) -> torch.Tensor:
    """``(x @ W.T) * rms_scale(partials) + bias`` in float32, rounded once: the layer after an RMSNorm whose weight
    ``x`` already carries (``int4_linear_add_norm``'s first output)."""
    weight = dequantize_int4(qweight, scales, mins, group_size, x.dtype).float()
    out = F.linear(x.float(), weight) * rms_scale(partials, x.shape[-1], eps)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def int4_gated_linear_norm_scaled_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                      mins: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                                      partials: torch.Tensor, eps: float, activation: str) -> torch.Tensor:
    """``act(gate) * up`` of ``int4_linear_norm_scaled`` on a ``[gate; up]`` weight, each half rounded first."""
    gate, up = int4_linear_norm_scaled_ref(x, qweight, scales, mins, group_size, bias, partials, eps).chunk(2, -1)
    return act_mul_ref(gate, up, activation)


@torch.library.custom_op("flux::int4_linear_add_norm", mutates_args=())
def _int4_linear_add_norm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                             group_size: int, bias: torch.Tensor | None, residual: torch.Tensor,
                             norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An INT4 layer, the residual add after it and the first half of the RMSNorm after that."""
    return int4_linear_add_norm_ref(x, qweight, scales, mins, group_size, bias, residual, norm_weight)


@_int4_linear_add_norm_op.register_fake
def _(x, qweight, scales, mins, group_size, bias, residual, norm_weight):
    n = qweight.shape[0]
    torch._check(residual.shape[-1] == n, lambda: "int4_linear_add_norm: residual must be [..., out_features]")
    shape = (*x.shape[:-1], n)
    return (x.new_empty(shape), x.new_empty(shape),
            x.new_empty((*x.shape[:-1], norm_partial_slots(n)), dtype=torch.float32))


@torch.library.custom_op("flux::int4_linear_norm_scaled", mutates_args=())
def _int4_linear_norm_scaled_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                                group_size: int, bias: torch.Tensor | None, partials: torch.Tensor,
                                eps: float) -> torch.Tensor:
    """An INT4 layer after an RMSNorm, the norm's scale applied to its sums."""
    return int4_linear_norm_scaled_ref(x, qweight, scales, mins, group_size, bias, partials, eps)


@_int4_linear_norm_scaled_op.register_fake
def _(x, qweight, scales, mins, group_size, bias, partials, eps):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("flux::int4_gated_linear_norm_scaled", mutates_args=())
def _int4_gated_linear_norm_scaled_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                      mins: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                                      partials: torch.Tensor, eps: float, activation: str) -> torch.Tensor:
    """``act(gate) * up`` of an INT4 ``[gate; up]`` layer after an RMSNorm."""
    return int4_gated_linear_norm_scaled_ref(x, qweight, scales, mins, group_size, bias, partials, eps, activation)


@_int4_gated_linear_norm_scaled_op.register_fake
def _(x, qweight, scales, mins, group_size, bias, partials, eps, activation):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


int8_linear = KernelOp("int8_linear", _int8_linear_op, int8_linear_ref)
int4_linear = KernelOp("int4_linear", _int4_linear_op, int4_linear_ref)
quantized_gated_linear = KernelOp("quantized_gated_linear", _quantized_gated_linear_op, quantized_gated_linear_ref)
int4_linear_add_norm = KernelOp("int4_linear_add_norm", _int4_linear_add_norm_op, int4_linear_add_norm_ref)
int4_linear_norm_scaled = KernelOp("int4_linear_norm_scaled", _int4_linear_norm_scaled_op, int4_linear_norm_scaled_ref)
int4_gated_linear_norm_scaled = KernelOp("int4_gated_linear_norm_scaled", _int4_gated_linear_norm_scaled_op,
                                         int4_gated_linear_norm_scaled_ref)
