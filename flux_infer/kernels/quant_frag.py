"""INT4 linear layers on the fragment layout: the layout, ``torch.ops.flux.int4f_linear`` and
``torch.ops.flux.int4f_linear_add_norm`` (``csrc/quant_frag.cu`` on CUDA), and their references.

The checkpoint layout (``kernels/quant.py``) stores each output feature's codes in input order. The fragment
layout reorders them, inside each tile of 32 features and each group of 128 inputs, so that one 16-byte shared
memory read per GPU lane holds the operands of eight ``m16n8k16`` tensor-core MMAs with the activations as the
other operand (Marlin's idea): the tile's codes for a group are one contiguous 2 KB run, read by one warp. A
group's 32 scales and 32 mins are one contiguous 128-byte pair (one request per warp and stage: as two 64-byte runs
in two tensors the 16-row gate/up and down calls took 0.2-0.5 us longer, docs/benchmarks.md, fifteenth session),
so the layout needs an even number of groups: the pairs of the first half of a tile's groups fill the tile's rows
of ``scales``, those of the second half its rows of ``mins``. Shapes and dtypes do not change, and a tile occupies
the same 32 rows of ``qweight``/``scales``/``mins`` in both layouts, so row slices in multiples of 32 (a fused
gate/up layer's halves) stay self-contained.

Within a tile ``lt`` (features ``32 lt ..``) and group ``grp``: word ``(p, g, t, j)`` (p, t, j < 4, g < 8) holds
feature ``32 lt + 8 j + g`` at inputs ``128 grp + 32 p + 8 a + 2 t + b`` in nibble ``a + 4 b`` (a < 4, b < 2); the
group's pair runs ``(c, t, j, e)``: the scale (c = 0) or min (c = 1) of feature ``32 lt + 8 j + 2 t + e``, at
element ``64 (grp mod G / 2)`` of the tile's ``32 G`` elements in ``scales`` (grp < G / 2) or ``mins``. Both
directions are permutations of a view, so they are also the references' first step.

The ops take what ``QuantizedLinear`` holds in that layout (group 128): ``int4f_linear`` is the plain layer, a
gated ``[gate; up]`` layer's ``act(gate) * up`` (``activation`` non-empty) and the layer after an RMSNorm
(``partials``: the norm's scale applied to its sums), ``int4f_linear_add_norm`` the layer before one; their
values are those of the checkpoint-layout ops in ``kernels/quant.py``, except that ``int4f_linear_add_norm``'s
sums of squares come one per 32 outputs.
"""

from __future__ import annotations

import torch

from flux_infer.kernels.activation import act_mul_ref
from flux_infer.kernels.quant import (
    int4_linear_add_norm_ref,
    int4_linear_norm_scaled_ref,
    int4_linear_ref,
    pack_int4,
    unpack_int4,
)
from flux_infer.kernels.registry import KernelOp

TILE = 32  # output features per fragment tile (one warp's share)
GROUP = 128  # the only group size the fragment kernels take
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device) -> torch.Tensor:
    """The CUDA kernel's per-device arrival counters (zeros; each launch leaves them zero). Made outside CUDA-graph
    capture by ``QuantizedLinear.set_fragments``' callers, before any launch."""
    device = torch.device(device)
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def fits(out_features: int, in_features: int, group_size: int | None) -> bool:
    """Whether an INT4 layer of this shape can take the fragment layout (an even number of 128-input groups)."""
    return group_size == GROUP and out_features % TILE == 0 and in_features % (2 * GROUP) == 0


def _codes_view(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    # [N, K] codes as (lt, j, g, grp, p, a, t, b): feature 32 lt + 8 j + g, input 128 grp + 32 p + 8 a + 2 t + b
    return codes.view(n // TILE, 4, 8, k // GROUP, 4, 4, 4, 2)


def _scales_view(values: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    return values.view(n // TILE, 4, 4, 2, groups)  # (lt, j, t, e, grp): feature 32 lt + 8 j + 2 t + e


def to_fragments(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checkpoint-layout ``(qweight, scales, mins)`` in the fragment layout (new tensors, same shapes)."""
    return _by_rows(_to_fragments, qweight, scales, mins)


def from_fragments(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``to_fragments``: the checkpoint layout back (new tensors)."""
    return _by_rows(_from_fragments, qweight, scales, mins)


def _by_rows(convert, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
             rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``convert`` over blocks of ``rows`` rows (tiles keep their rows): the unpacked codes of a whole lm_head would
    take gigabytes."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    _check(n, k, scales)
    if n <= rows:
        return convert(qweight, scales, mins)
    out = (torch.empty_like(qweight), torch.empty_like(scales), torch.empty_like(mins))
    for r in range(0, n, rows):
        for dst, value in zip(out, convert(qweight[r:r + rows], scales[r:r + rows], mins[r:r + rows]), strict=True):
            dst[r:r + rows] = value
    return out


def _to_fragments(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = qweight.shape[0], qweight.shape[1] * 8
    codes = unpack_int4(qweight).to(torch.uint8)
    # destination order (lt, grp, p, g, t, j, b, a): nibble a + 4 b of word (p, g, t, j)
    frag = _codes_view(codes, n, k).permute(0, 3, 4, 2, 6, 1, 7, 5).reshape(n, k)
    groups = k // GROUP
    # per tile and group the pair (c, t, j, e): c = 0 the scales, 1 the mins
    pairs = torch.stack([_scales_view(v, n, groups).permute(0, 4, 2, 1, 3).reshape(n // TILE, groups, TILE)
                         for v in (scales, mins)], dim=2)
    half = groups // 2
    return pack_int4(frag), pairs[:, :half].reshape(n, groups), pairs[:, half:].reshape(n, groups)


def _from_fragments(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = qweight.shape[0], qweight.shape[1] * 8
    groups = k // GROUP
    frag = unpack_int4(qweight).to(torch.uint8).view(n // TILE, groups, 4, 8, 4, 4, 2, 4)  # lt grp p g t j b a
    codes = frag.permute(0, 5, 3, 1, 2, 7, 4, 6).reshape(n, k)
    pairs = torch.cat([v.view(n // TILE, groups // 2, 2, TILE) for v in (scales, mins)], dim=1)  # lt grp c (t j e)
    back = (0, 3, 2, 4, 1)  # (lt, grp, t, j, e) -> (lt, j, t, e, grp)
    return (pack_int4(codes),
            pairs[:, :, 0].reshape(n // TILE, groups, 4, 4, 2).permute(*back).reshape(n, groups),
            pairs[:, :, 1].reshape(n // TILE, groups, 4, 4, 2).permute(*back).reshape(n, groups))


def _check(n: int, k: int, scales: torch.Tensor) -> None:
    if not fits(n, k, k // scales.shape[1] if scales.shape[1] else None) or scales.shape[0] != n:
        raise ValueError(f"the fragment layout needs out_features % {TILE} == 0 and an even number of groups of "
                         f"{GROUP} inputs; got codes [{n}, {k // 8}] and scales {list(scales.shape)}")


# ---- the ops ----------------------------------------------------------------------------------------------------
def int4f_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     bias: torch.Tensor | None, activation: str, partials: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """The layer (``partials``: after an RMSNorm, as ``int4_linear_norm_scaled``), then ``act(gate) * up`` of its
    halves when ``activation`` is set, each half rounded first."""
    q, s, m = from_fragments(qweight, scales, mins)
    if partials is None:
        out = int4_linear_ref(x, q, s, m, GROUP, bias)
    else:
        out = int4_linear_norm_scaled_ref(x, q, s, m, GROUP, bias, partials, eps)
    if not activation:
        return out
    gate, up = out.chunk(2, dim=-1)
    return act_mul_ref(gate, up, activation)


def int4f_linear_add_norm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                              bias: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h * norm_weight, h, partials)`` as ``int4_linear_add_norm``, the sums of squares one slot per 32 outputs."""
    q, s, m = from_fragments(qweight, scales, mins)
    normed, h, _ = int4_linear_add_norm_ref(x, q, s, m, GROUP, bias, residual, norm_weight)
    partials = h.float().pow(2).view(*h.shape[:-1], h.shape[-1] // TILE, TILE).sum(-1)
    return normed, h, partials


@torch.library.custom_op("flux::int4f_linear", mutates_args=())
def _int4f_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     bias: torch.Tensor | None, activation: str, partials: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """A fragment-layout INT4 layer (gated, after an RMSNorm)."""
    return int4f_linear_ref(x, qweight, scales, mins, bias, activation, partials, eps)


@_int4f_linear_op.register_fake
def _(x, qweight, scales, mins, bias, activation, partials, eps):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2 if activation else qweight.shape[0]))


@torch.library.custom_op("flux::int4f_linear_add_norm", mutates_args=())
def _int4f_linear_add_norm_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                              bias: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fragment-layout INT4 layer, the residual add after it and the first half of the RMSNorm after that."""
    return int4f_linear_add_norm_ref(x, qweight, scales, mins, bias, residual, norm_weight)


@_int4f_linear_add_norm_op.register_fake
def _(x, qweight, scales, mins, bias, residual, norm_weight):
    shape = (*x.shape[:-1], qweight.shape[0])
    return (x.new_empty(shape), x.new_empty(shape),
            x.new_empty((*x.shape[:-1], qweight.shape[0] // TILE), dtype=torch.float32))


int4f_linear = KernelOp("int4f_linear", _int4f_linear_op, int4f_linear_ref)
int4f_linear_add_norm = KernelOp("int4f_linear_add_norm", _int4f_linear_add_norm_op, int4f_linear_add_norm_ref)
