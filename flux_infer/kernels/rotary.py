"""Rotary position embedding applied to q and k in place: ``torch.ops.flux.rotary_embedding_``.

The rotate-half ("NeoX") convention of transformers' Llama family, on the first ``rotary_dim`` features of each
head (partial rotary leaves the rest alone). ``cos``/``sin`` are tables ``[max_position, rotary_dim]`` (both
halves present, as transformers builds them); ``positions`` selects a row for every token.
"""

from __future__ import annotations

import torch

from flux_infer.kernels.registry import KernelOp


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         positions: torch.Tensor) -> None:
    """q ``[..., heads, head_dim]``, k ``[..., kv_heads, head_dim]``, positions ``[...]``; rotates in place.

    Same arithmetic as transformers' ``apply_rotary_pos_emb`` (cos/sin cast to the activations' dtype first).
    """
    rot = cos.shape[-1]
    c = cos[positions].to(q.dtype).unsqueeze(-2)  # [..., 1, rot]
    s = sin[positions].to(q.dtype).unsqueeze(-2)
    for t in (q, k):
        part = t[..., :rot]
        t[..., :rot] = part * c + _rotate_half(part) * s


@torch.library.custom_op("flux::rotary_embedding_", mutates_args=("q", "k"))
def _rotary_embedding_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor) -> None:
    """Rotate q and k in place by the angles of ``positions``."""
    rotary_embedding_ref(q, k, cos, sin, positions)


@_rotary_embedding_op.register_fake
def _(q, k, cos, sin, positions) -> None:
    torch._check(cos.shape == sin.shape, lambda: "rotary_embedding_: cos and sin tables must match")
    return None


rotary_embedding_ = KernelOp("rotary_embedding_", _rotary_embedding_op, rotary_embedding_ref)


def rotary_cache_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slots: torch.Tensor) -> None:
    """Rotate q, k ``[B, T, heads, D]`` in place, then write k and v into ``[B', kv_heads, S, D]`` caches at
    ``slots`` (``[T]``, the same for every row); rows ``[0, B)`` of the caches."""
    rotary_embedding_ref(q, k, cos, sin, positions)
    rows = k.shape[0]
    k_cache[:rows].index_copy_(2, slots, k.transpose(1, 2))
    v_cache[:rows].index_copy_(2, slots, v.transpose(1, 2))


@torch.library.custom_op("flux::rotary_cache_write_", mutates_args=("q", "k", "k_cache", "v_cache"))
def _rotary_cache_write_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slots: torch.Tensor) -> None:
    """Rotary embedding of q and k, and this step's keys/values into the cache, in one pass."""
    rotary_cache_write_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots)


@_rotary_cache_write_op.register_fake
def _(q, k, v, cos, sin, positions, k_cache, v_cache, slots) -> None:
    return None


rotary_cache_write_ = KernelOp("rotary_cache_write_", _rotary_cache_write_op, rotary_cache_write_ref)
