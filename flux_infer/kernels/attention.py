"""Attention over a static KV cache: ``torch.ops.flux.cache_attention``.

The cache holds each sequence at slots ``[0, S)`` of ``[batch, kv_heads, S, head_dim]``. Row ``b`` is valid from
slot ``kv_start[b]`` (left padding before it) to ``kv_end[b]`` (exclusive); its ``T`` queries are the last ``T``
valid slots, attending causally (and within ``window`` slots when ``window > 0``). Grouped-query attention is
native: query head ``h`` reads kv head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_infer.kernels import rotary
from flux_infer.kernels.registry import KernelOp


def cache_attention_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, q_len: int, kv_len: int,
                         window: int) -> torch.Tensor:
    """Boolean ``[batch, 1, q_len, kv_len]``: True where query ``t`` of row ``b`` may attend to slot ``j``."""
    device = kv_start.device
    slots = torch.arange(kv_len, device=device)
    query_slot = kv_end[:, None].long() - q_len + torch.arange(q_len, device=device)  # [B, T]
    allowed = (slots[None, None, :] >= kv_start[:, None, None].long()) & (slots[None, None, :] <= query_slot[..., None])
    if window > 0:
        allowed &= slots[None, None, :] > query_slot[..., None] - window
    # A query in the padding (before kv_start) attends to itself only, so it stays finite.
    allowed |= slots[None, None, :] == query_slot[..., None]
    return allowed[:, None]


def masked_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The reference's second half: SDPA of q ``[B, T, H, D]`` over the cache under a precomputed mask."""
    heads, kv_heads = q.shape[2], k_cache.shape[1]
    k, v = k_cache, v_cache
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def cache_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                        kv_end: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """q ``[B, T, H, D]`` -> out ``[B, T, H, D]``; the reference uses every slot of the cache given."""
    mask = cache_attention_mask(kv_start, kv_end, q.shape[1], k_cache.shape[2], window)
    return masked_attention_ref(q, k_cache, v_cache, mask, scale).contiguous()


@torch.library.custom_op("flux::cache_attention", mutates_args=())
def _cache_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                        kv_end: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """Attention of ``T`` new queries per row over the row's valid cache slots."""
    return cache_attention_ref(q, k_cache, v_cache, kv_start, kv_end, scale, window)


@_cache_attention_op.register_fake
def _(q, k_cache, v_cache, kv_start, kv_end, scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


cache_attention = KernelOp("cache_attention", _cache_attention_op, cache_attention_ref)


def rotary_cache_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slots: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor, scale: float,
                               window: int) -> torch.Tensor:
    """One decode step's attention with its rotary embedding and cache write: ``rotary_cache_write_`` (on copies
    of q and k, which are left as they are) and then ``cache_attention`` over rows ``[0, B)`` of the caches.

    q ``[B, 1, heads, D]``, k/v ``[B, 1, kv_heads, D]``, caches ``[B', kv_heads, S, D]`` -> ``[B, 1, heads, D]``.
    """
    q, k = q.clone(), k.clone()
    rotary.rotary_cache_write_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
    rows = q.shape[0]
    return cache_attention_ref(q, k_cache[:rows], v_cache[:rows], kv_start, kv_end, scale, window)


@torch.library.custom_op("flux::rotary_cache_attention", mutates_args=("k_cache", "v_cache"))
def _rotary_cache_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, slots: torch.Tensor, kv_start: torch.Tensor,
                               kv_end: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """Rotary embedding, cache write and attention of one new token per row (one kernel on CUDA)."""
    return rotary_cache_attention_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots, kv_start, kv_end,
                                      scale, window)


@_rotary_cache_attention_op.register_fake
def _(q, k, v, cos, sin, positions, k_cache, v_cache, slots, kv_start, kv_end, scale, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


rotary_cache_attention = KernelOp("rotary_cache_attention", _rotary_cache_attention_op, rotary_cache_attention_ref)


def rotary_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                          kv_start: torch.Tensor, kv_end: torch.Tensor) -> bool:
    """Whether ``flux::rotary_cache_attention`` runs as one CUDA kernel (csrc/decode_attention.cu) for these inputs:
    what that kernel's checks ask for, so that anything else takes the two-kernel path instead of an error. A pure
    shape check (no device needed): the static cache asks it before choosing the op."""
    rows, length, heads, dim = q.shape
    kv_heads = k.shape[2]

    def rows_fit(t: torch.Tensor) -> bool:  # [rows, 1, heads, D] with 16-byte aligned heads
        return (t.dtype == q.dtype and t.shape[-1] == dim and t.stride(-1) == 1 and t.stride(0) % 8 == 0
                and t.stride(2) % 8 == 0 and t.data_ptr() % 16 == 0)

    def cache_fits(t: torch.Tensor) -> bool:  # [>= rows, kv_heads, slots, D], contiguous slots
        return (t.dim() == 4 and t.dtype == q.dtype and t.shape[0] >= rows and t.shape[1] == kv_heads
                and t.shape[3] == dim and t.stride(3) == 1 and t.stride(2) == dim and t.stride(1) % 8 == 0
                and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0)

    def table_fits(t: torch.Tensor) -> bool:
        return (t.dim() == 2 and t.dtype == torch.float32 and t.is_contiguous() and t.shape == cos.shape
                and t.shape[1] % 16 == 0 and t.shape[1] <= dim and t.data_ptr() % 16 == 0)

    return (length == 1 and q.dtype in (torch.bfloat16, torch.float16) and dim in (64, 128)
            and heads % kv_heads == 0 and heads // kv_heads <= 8 and v.shape[2] == kv_heads
            and rows_fit(q) and rows_fit(k) and rows_fit(v) and table_fits(cos) and table_fits(sin)
            and cache_fits(k_cache) and cache_fits(v_cache) and k_cache.stride() == v_cache.stride()
            and positions.dtype == torch.int64 and positions.numel() == rows and positions.is_contiguous()
            and slots.dtype == torch.int64 and slots.numel() == 1
            and all(t.dtype == torch.int32 and t.numel() == rows and t.is_contiguous() for t in (kv_start, kv_end)))


def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                        window: int, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a flat batch of sequences over a paged KV cache.

    q ``[N, heads, D]`` holds sequence ``s``'s new tokens at rows ``query_start[s]:query_start[s+1]``; they are the
    last tokens of its ``context_lens[s]`` cached ones, whose slot ``j`` lives at pool row
    ``block_tables[s, j // block_size] * block_size + j % block_size`` of ``k_pool``/``v_pool`` ``[slots, kv_heads, D]``.
    Every sequence adds at least one token (``N == sequences`` means a decode step). Causal, optionally within
    ``window`` positions; returns ``[N, heads, D]``. An INT8 pool comes with
    ``k_scale``/``v_scale`` ``[slots, kv_heads]``: a cached vector is ``code * scale``.
    """
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_pool.shape[1]
    starts = query_start.tolist()
    for s, context in enumerate(context_lens.tolist()):
        lo, hi = starts[s], starts[s + 1]
        if hi == lo:
            continue
        positions = torch.arange(context, device=q.device)
        rows = block_tables[s, positions // block_size].long() * block_size + positions % block_size
        k, v = k_pool[rows], v_pool[rows]  # [context, kv_heads, D]
        if k_scale is not None:
            k = (k.float() * k_scale[rows, :, None].float()).to(q.dtype)
            v = (v.float() * v_scale[rows, :, None].float()).to(q.dtype)
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, context, D]
        if heads != kv_heads:
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
        query_pos = context - (hi - lo) + torch.arange(hi - lo, device=q.device)
        allowed = positions[None, :] <= query_pos[:, None]
        if window > 0:
            allowed &= positions[None, :] > query_pos[:, None] - window
        o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k, v, attn_mask=allowed, scale=scale)
        out[lo:hi] = o.transpose(0, 1)
    return out


@torch.library.custom_op("flux::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                        window: int, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a flat batch of sequences over a paged (optionally INT8) KV cache."""
    return paged_attention_ref(q, k_pool, v_pool, block_tables, context_lens, query_start, block_size, scale, window,
                               k_scale, v_scale)


@_paged_attention_op.register_fake
def _(q, k_pool, v_pool, block_tables, context_lens, query_start, block_size, scale, window, k_scale=None,
      v_scale=None):
    return torch.empty_like(q)


paged_attention = KernelOp("paged_attention", _paged_attention_op, paged_attention_ref)


def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per (token, head): ``[N, heads, D]`` -> codes int8 and scales float32 ``[N, heads]``."""
    xf = x.float()
    scale = (xf.abs().amax(-1) * (1.0 / 127.0)).clamp(min=1e-8)  # a product: the same in every kernel
    return torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def paged_kv_write_ref(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """Store k, v ``[N, kv_heads, D]`` at pool rows ``slot_mapping`` ``[N]``; an INT8 pool (with ``k_scale``/
    ``v_scale`` ``[slots, kv_heads]``) gets symmetric codes and one scale per (token, head)."""
    if k_scale is None:
        k_pool.index_copy_(0, slot_mapping, k.to(k_pool.dtype))
        v_pool.index_copy_(0, slot_mapping, v.to(v_pool.dtype))
        return
    for pool, scales, x in ((k_pool, k_scale, k), (v_pool, v_scale, v)):
        codes, scale = quantize_kv_int8(x)
        pool.index_copy_(0, slot_mapping, codes)
        scales.index_copy_(0, slot_mapping, scale)


@torch.library.custom_op("flux::paged_kv_write_", mutates_args=("k_pool", "v_pool", "k_scale", "v_scale"))
def _paged_kv_write_op(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                       slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """This step's keys and values into the paged pool (quantized when the pool is INT8)."""
    paged_kv_write_ref(k, v, k_pool, v_pool, slot_mapping, k_scale, v_scale)


@_paged_kv_write_op.register_fake
def _(k, v, k_pool, v_pool, slot_mapping, k_scale=None, v_scale=None) -> None:
    return None


paged_kv_write_ = KernelOp("paged_kv_write_", _paged_kv_write_op, paged_kv_write_ref)
