"""Triton decode attention over the static KV cache (split-K "flash decoding"), the CUDA side of
``flux::cache_attention`` for one query per row; longer query blocks (prefill) use PyTorch SDPA.

One program handles a (row, kv head, key chunk): all query heads of that kv head's group against the chunk,
with an online softmax; a second kernel merges the chunks. The valid range is read from device memory, so the
kernels are CUDA-graph safe and skip the unused tail of the cache.
"""

from __future__ import annotations

import math

import torch

from flux_infer.kernels import attention, cuda

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (CPU-only installs)
    triton = None

BLOCK_N = 64
# Programmatic dependent launch (Hopper): the kernels may start while the rotary kernel before them finishes and
# let the next kernel start while they run (both still wait for their inputs with griddepcontrol.wait).
GDC = triton is not None and hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _chunk_kernel(Q, K, V, Start, End, PartO, PartM, PartL,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                      scale, window, chunk, splits,
                      G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, USE_GDC: tl.constexpr, EARLY_TRIGGER: tl.constexpr):
        if USE_GDC:  # every input comes from earlier kernels: wait for them before the first load
            tl.extra.cuda.gdc_wait()
            if EARLY_TRIGGER:  # see flux_infer.kernels.cuda.early_trigger
                tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        start = tl.load(Start + b)
        end = tl.load(End + b)
        lo = start
        if window > 0:
            lo = tl.maximum(lo, end - window)
        chunk_lo = split * chunk
        hi = tl.minimum(chunk_lo + chunk, end)
        lo = tl.maximum(lo, chunk_lo)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < G
        d_mask = offs_d < D
        q = tl.load(Q + b * stride_qb + (kvh * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            s = tl.where(n_mask[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
        if USE_GDC and not EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        part = (b * tl.num_programs(1) + kvh) * splits + split
        tl.store(PartO + (part * G + offs_g)[:, None] * D + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])
        tl.store(PartM + part * G + offs_g, m_i, mask=g_mask)
        tl.store(PartL + part * G + offs_g, l_i, mask=g_mask)

    @triton.jit
    def online_softmax_step(scores, v, m_i, l_i, acc):
        """One block of keys into a running softmax (flash attention): ``scores`` ``[rows, BLOCK_N]`` with
        disallowed entries at -inf, ``v`` ``[BLOCK_N, D]``. A row with nothing allowed yet stays at zero."""
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit(do_not_specialize=["splits"])
    def _merge_kernel(PartO, PartM, PartL, Rows, Out, stride_on, stride_oh, splits,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                      HAS_ROWS: tl.constexpr, USE_GDC: tl.constexpr, EARLY_TRIGGER: tl.constexpr):
        """Combine the split-K partials of (sequence, head) into its output row (``Rows[sequence]``, or the
        sequence's own index)."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            if EARLY_TRIGGER:  # see flux_infer.kernels.cuda.early_trigger
                tl.extra.cuda.gdc_launch_dependents()
        seq = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // G
        g = h % G
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < splits
        part = (seq * (tl.num_programs(1) // G) + kvh) * splits + offs_s
        m = tl.load(PartM + part * G + g, mask=s_mask, other=float("-inf"))
        l_part = tl.load(PartL + part * G + g, mask=s_mask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(s_mask, tl.exp(m - m_max), 0.0)
        o = tl.load(PartO + (part * G + g)[:, None] * D + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d < D)[None, :], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.sum(l_part * w, 0)
        if USE_GDC and not EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_ROWS:
            row = tl.load(Rows + seq)
        else:
            row = seq
        tl.store(Out + row * stride_on + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def plan_splits(positions: int, programs: int, sms: int, block_n: int) -> tuple[int, int]:
    """(splits, chunk): cut ``positions`` keys into chunks of whole ``block_n`` blocks so that ``programs``
    (sequences x kv heads) times the splits give about two programs per SM."""
    blocks = max(1, math.ceil(positions / block_n))
    splits = max(1, min(blocks, math.ceil(2 * sms / max(1, programs))))
    chunk = math.ceil(blocks / splits) * block_n
    return max(1, math.ceil(positions / chunk)), chunk


def split_partials(parts: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split output, running max and running sum buffers (float32) for ``parts`` (program, head) pairs."""
    return (torch.empty(parts, dim, dtype=torch.float32, device=device),
            torch.empty(parts, dtype=torch.float32, device=device),
            torch.empty(parts, dtype=torch.float32, device=device))


def programmatic_launch() -> bool:
    """Launch the decode kernels with programmatic dependent launch: when flux's CUDA kernels do (Hopper and
    later, not turned off by FLUX_INFER_DISABLE_PDL) and this Triton has the grid-dependency intrinsics."""
    return GDC and cuda.programmatic_launch()


def gdc_options(pdl: bool, sequences: int) -> dict:
    """Keyword arguments of a decode kernel launch: its USE_GDC switch and, with it, Triton's PDL launch flag
    (the two always agree: a kernel launched with PDL must wait before its first load), and where it lets its
    dependents launch: from its start for up to ``cuda.early_trigger_rows()`` sequences (one by default), else after
    its work."""
    if not pdl:
        return {"USE_GDC": False, "EARLY_TRIGGER": False}
    return {"USE_GDC": True, "EARLY_TRIGGER": cuda.trigger_early(sequences), "launch_pdl": True}


def merge_splits(partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor], out: torch.Tensor,
                 rows: torch.Tensor | None, sequences: int, heads: int, group: int, splits: int, stride_on: int,
                 stride_oh: int, pdl: bool = False) -> None:
    """Write each (sequence, head)'s merged output into ``out`` at row ``rows[sequence]`` (or ``sequence``)."""
    part_o, part_m, part_l = partials
    dim = part_o.shape[1]
    _merge_kernel[(sequences, heads)](
        part_o, part_m, part_l, rows if rows is not None else part_m, out, stride_on, stride_oh, splits,
        G=group, D=dim, BLOCK_D=triton.next_power_of_2(dim), BLOCK_S=max(2, triton.next_power_of_2(splits)),
        HAS_ROWS=rows is not None, **gdc_options(pdl, sequences),
    )


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                     kv_end: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """q ``[B, 1, H, D]`` over ``k_cache``/``v_cache`` ``[B, KVH, S, D]`` -> ``[B, 1, H, D]``."""
    batch, _, heads, dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    q3 = q[:, 0]
    splits, chunk = plan_splits(slots, batch * kv_heads, sm_count(q.device), BLOCK_N)
    part_o, part_m, part_l = partials = split_partials(batch * kv_heads * splits * group, dim, q.device)
    pdl = programmatic_launch()
    _chunk_kernel[(batch, kv_heads, splits)](
        q3, k_cache, v_cache, kv_start, kv_end, part_o, part_m, part_l,
        q3.stride(0), q3.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        scale, window, chunk, splits,
        G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=BLOCK_N, **gdc_options(pdl, batch),
    )
    out = torch.empty(batch, 1, heads, dim, dtype=q.dtype, device=q.device)
    merge_splits(partials, out, None, batch, heads, group, splits, out.stride(0), out.stride(2), pdl)
    return out


def cache_attention_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor,
                         kv_end: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """CUDA implementation of ``flux::cache_attention``: Triton for decode, SDPA for longer query blocks."""
    if q.shape[1] == 1 and k_cache.stride(-1) == 1 and q.stride(-1) == 1:
        return decode_attention(q, k_cache, v_cache, kv_start, kv_end, scale, window)
    return attention.cache_attention_ref(q, k_cache, v_cache, kv_start, kv_end, scale, window)
