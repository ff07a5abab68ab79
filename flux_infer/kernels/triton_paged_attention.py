"""Triton paged attention over the pool's blocks (optionally INT8), for decode and for mixed prefill steps.

Decode (one new token per sequence) is split-K like the static-cache kernel: a program handles (sequence, kv head,
chunk of positions) for all the query heads of the group, gathering key/value rows through the sequence's block
table (contiguous within a block) and dequantizing INT8 codes with their per (token, head) scales; a second
kernel merges the chunks.

Steps with prefill chunks (any number of new tokens per sequence, decodes mixed in) run one flash-attention style
kernel over tiles of ``BLOCK_Q`` query tokens x the query heads of one kv head. Tiles are numbered so that
sequence ``s``'s first tile is ``query_start[s] // BLOCK_Q + s``: the grid (``tokens // BLOCK_Q + sequences``
tiles) is known without reading lengths back, and each program finds its sequence by binary search.
"""

from __future__ import annotations

import torch

from flux_infer.kernels import attention, triton_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (CPU-only installs)
    triton = None

BLOCK_N = 32  # positions per iteration of the prefill kernel (tl.dot needs at least 16)
# decode kernel launch parameters (benchmarks/paged_attention.py --sweep measures the alternatives)
DECODE_CONFIG = {"block_n": 32, "num_warps": 4, "num_stages": 3}


def available() -> bool:
    return triton is not None


if triton is not None:
    from flux_infer.kernels.triton_attention import online_softmax_step

    @triton.jit
    def _gather_kv(K, V, KS, VS, table, pos, n_mask, kvh, offs_d, d_mask, block_size, stride_kr, stride_kh,
                   stride_sr, dtype: tl.constexpr, INT8: tl.constexpr):
        """Keys and values ``[BLOCK_N, BLOCK_D]`` of positions ``pos`` of one sequence (its block ``table`` row) and
        kv head; INT8 codes come back as ``code * scale`` in ``dtype`` (the queries')."""
        block = tl.load(table + pos // block_size, mask=n_mask, other=0)
        rows = block.to(tl.int64) * block_size + pos % block_size
        k = tl.load(K + rows[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0)
        v = tl.load(V + rows[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0)
        if INT8:
            k = (k.to(tl.float32) * tl.load(KS + rows * stride_sr + kvh, mask=n_mask, other=0.0)[:, None]).to(dtype)
            v = (v.to(tl.float32) * tl.load(VS + rows * stride_sr + kvh, mask=n_mask, other=0.0)[:, None]).to(dtype)
        return k, v

    # step-dependent integers are not specialized on (a new value must not compile a new kernel mid-run)
    @triton.jit(do_not_specialize=["chunk", "splits"])
    def _paged_chunk_kernel(Q, K, V, KS, VS, Tables, Lens, QStart, PartO, PartM, PartL,
                            stride_qn, stride_qh, stride_kr, stride_kh, stride_sr, stride_tb,
                            block_size, scale, window, chunk, splits,
                            INT8: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, USE_GDC: tl.constexpr,
                            EARLY_TRIGGER: tl.constexpr):
        if USE_GDC:  # programmatic dependent launch: every input comes from earlier kernels
            tl.extra.cuda.gdc_wait()
            if EARLY_TRIGGER:  # see flux_infer.kernels.cuda.early_trigger
                tl.extra.cuda.gdc_launch_dependents()
        s = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        context = tl.load(Lens + s)
        row = tl.load(QStart + s)
        lo = 0
        if window > 0:
            lo = tl.maximum(lo, context - window)
        chunk_lo = split * chunk
        hi = tl.minimum(chunk_lo + chunk, context)
        lo = tl.maximum(lo, chunk_lo)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < G
        d_mask = offs_d < D
        q = tl.load(Q + row * stride_qn + (kvh * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            n_mask = pos < hi
            k, v = _gather_kv(K, V, KS, VS, Tables + s * stride_tb, pos, n_mask, kvh, offs_d, d_mask, block_size,
                              stride_kr, stride_kh, stride_sr, q.dtype, INT8)
            scores = tl.where(n_mask[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
            m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc)
        if USE_GDC and not EARLY_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        part = (s * tl.num_programs(1) + kvh) * splits + split
        tl.store(PartO + (part * G + offs_g)[:, None] * D + offs_d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])
        tl.store(PartM + part * G + offs_g, m_i, mask=g_mask)
        tl.store(PartL + part * G + offs_g, l_i, mask=g_mask)

    @triton.jit(do_not_specialize=["num_seqs"])
    def _paged_prefill_kernel(Q, K, V, KS, VS, Out, Tables, Lens, QStart, num_seqs,
                              stride_qn, stride_qh, stride_on, stride_oh, stride_kr, stride_kh, stride_sr, stride_tb,
                              block_size, scale, window,
                              INT8: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
                              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        tile_id = tl.program_id(0)
        kvh = tl.program_id(1)
        lo = 0
        hi = num_seqs
        while lo < hi:  # the last sequence whose first tile is at or before this one
            mid = (lo + hi) // 2
            if tl.load(QStart + mid) // BLOCK_Q + mid <= tile_id:
                lo = mid + 1
            else:
                hi = mid
        s = lo - 1
        q_begin = tl.load(QStart + s)
        q_len = tl.load(QStart + s + 1) - q_begin
        tile = tile_id - (q_begin // BLOCK_Q + s)
        if tile * BLOCK_Q >= q_len:
            return
        context = tl.load(Lens + s)
        offs_m = tl.arange(0, BLOCK_Q * G_PAD)  # rows: (query token, head of the group)
        qi = tile * BLOCK_Q + offs_m // G_PAD
        head = kvh * G + offs_m % G_PAD
        m_valid = (qi < q_len) & (offs_m % G_PAD < G)
        q_pos = context - q_len + qi
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(Q + (q_begin + qi)[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
                    mask=m_valid[:, None] & d_mask[None, :], other=0.0)
        first = context - q_len + tile * BLOCK_Q
        key_hi = tl.minimum(context, first + BLOCK_Q)
        key_lo = 0
        if window > 0:
            key_lo = tl.maximum(0, first - window + 1)
        m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_Q * G_PAD, BLOCK_D], tl.float32)
        for n0 in range(key_lo, key_hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            n_mask = pos < key_hi
            k, v = _gather_kv(K, V, KS, VS, Tables + s * stride_tb, pos, n_mask, kvh, offs_d, d_mask, block_size,
                              stride_kr, stride_kh, stride_sr, q.dtype, INT8)
            scores = tl.dot(q, tl.trans(k)) * scale  # [rows, BLOCK_N]
            allowed = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
            if window > 0:
                allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(allowed, scores, float("-inf"))
            m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + (q_begin + qi)[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


    @triton.jit
    def _round_half_even(x):
        """torch.round for |x| < 2**22 (exact: x + 0.5 needs no rounding there)."""
        r = tl.floor(x + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(((r - x) == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _paged_kv_write_kernel(K, V, KPool, VPool, KS, VS, Slots, stride_kn, stride_kh, stride_vn, stride_vh,
                               stride_pr, stride_ph, stride_sr, INT8: tl.constexpr, D: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        n = tl.program_id(0)
        h = tl.program_id(1)
        row = tl.load(Slots + n)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        k = tl.load(K + n * stride_kn + h * stride_kh + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + n * stride_vn + h * stride_vh + offs, mask=mask, other=0.0).to(tl.float32)
        dst = row * stride_pr + h * stride_ph + offs
        if INT8:  # symmetric, one scale per (token, head), as quantize_kv_int8 computes it
            k_scale = tl.maximum(tl.max(tl.abs(k), 0) * (1.0 / 127.0), 1e-8)
            v_scale = tl.maximum(tl.max(tl.abs(v), 0) * (1.0 / 127.0), 1e-8)
            k_codes = tl.clamp(_round_half_even(tl.math.div_rn(k, k_scale)), -127.0, 127.0)
            v_codes = tl.clamp(_round_half_even(tl.math.div_rn(v, v_scale)), -127.0, 127.0)
            tl.store(KPool + dst, k_codes.to(tl.int8), mask=mask)
            tl.store(VPool + dst, v_codes.to(tl.int8), mask=mask)
            tl.store(KS + row * stride_sr + h, k_scale)
            tl.store(VS + row * stride_sr + h, v_scale)
        else:
            tl.store(KPool + dst, k.to(KPool.dtype.element_ty), mask=mask)
            tl.store(VPool + dst, v.to(VPool.dtype.element_ty), mask=mask)


def paged_kv_write_cuda(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                        slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> None:
    """CUDA implementation of ``flux::paged_kv_write_``: one program per (token, kv head)."""
    if k.stride(-1) != 1 or v.stride(-1) != 1 or k_pool.stride(-1) != 1 or (
            k_scale is not None and k_scale.stride(-1) != 1):
        attention.paged_kv_write_ref(k, v, k_pool, v_pool, slot_mapping, k_scale, v_scale)
        return
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    int8 = k_scale is not None
    _paged_kv_write_kernel[(tokens, kv_heads)](
        k, v, k_pool, v_pool, k_scale if int8 else k_pool, v_scale if int8 else v_pool, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_pool.stride(0), k_pool.stride(1),
        k_scale.stride(0) if int8 else 0, INT8=int8, D=dim, BLOCK_D=triton.next_power_of_2(dim),
    )


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, query_start: torch.Tensor,
                            block_size: int, scale: float, window: int, k_scale: torch.Tensor | None,
                            v_scale: torch.Tensor | None) -> torch.Tensor:
    """q ``[N, heads, D]`` (any number of new tokens per sequence) over the paged pool -> ``[N, heads, D]``."""
    tokens, heads, dim = q.shape
    sequences = context_lens.shape[0]
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, 64 // group_pad)
    out = torch.empty_like(q)
    int8 = k_scale is not None
    scales_k = k_scale if int8 else out
    scales_v = v_scale if int8 else out
    _paged_prefill_kernel[(tokens // block_q + sequences, kv_heads)](
        q, k_pool, v_pool, scales_k, scales_v, out, block_tables, context_lens, query_start, sequences,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_pool.stride(0), k_pool.stride(1),
        scales_k.stride(0) if int8 else 0, block_tables.stride(0), block_size, scale, window,
        INT8=int8, G=group, G_PAD=group_pad, BLOCK_Q=block_q, D=dim, BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=BLOCK_N,
    )
    return out


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                           window: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           max_context: int, sm_count: int) -> torch.Tensor:
    """q ``[S, heads, D]`` (one token per sequence) over the paged pool -> ``[S, heads, D]``."""
    sequences = context_lens.shape[0]
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    block_n = DECODE_CONFIG["block_n"]
    splits, chunk = triton_attention.plan_splits(max_context, sequences * kv_heads, sm_count, block_n)
    part_o, part_m, part_l = partials = triton_attention.split_partials(sequences * kv_heads * splits * group, dim,
                                                                        q.device)
    int8 = k_scale is not None
    pdl = triton_attention.programmatic_launch()
    scales_k = k_scale if int8 else part_m
    scales_v = v_scale if int8 else part_m
    _paged_chunk_kernel[(sequences, kv_heads, splits)](
        q, k_pool, v_pool, scales_k, scales_v, block_tables, context_lens, query_start, part_o, part_m, part_l,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), scales_k.stride(0) if int8 else 0,
        block_tables.stride(0), block_size, scale, window, chunk, splits,
        INT8=int8, G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=dim,
        BLOCK_D=triton.next_power_of_2(dim), BLOCK_N=block_n, num_warps=DECODE_CONFIG["num_warps"],
        num_stages=DECODE_CONFIG["num_stages"], **triton_attention.gdc_options(pdl, sequences),
    )
    out = torch.empty_like(q)
    triton_attention.merge_splits(partials, out, query_start, sequences, heads, group, splits, out.stride(0),
                                  out.stride(1), pdl)
    return out


def paged_attention_cuda(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                         context_lens: torch.Tensor, query_start: torch.Tensor, block_size: int, scale: float,
                         window: int, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA implementation of ``flux::paged_attention``: the split-K decode kernel when every sequence adds one
    token, the tiled kernel when some add more (prefill chunks)."""
    if k_pool.stride(-1) != 1 or q.stride(-1) != 1:
        return attention.paged_attention_ref(q, k_pool, v_pool, block_tables, context_lens, query_start,
                                             block_size, scale, window, k_scale, v_scale)
    if q.shape[0] == context_lens.shape[0]:
        # the block tables' width bounds every context without reading the lengths back (no host sync)
        max_context = block_tables.shape[1] * block_size
        return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, query_start, block_size,
                                      scale, window, k_scale, v_scale, max_context,
                                      triton_attention.sm_count(q.device))
    return paged_prefill_attention(q, k_pool, v_pool, block_tables, context_lens, query_start, block_size, scale,
                                   window, k_scale, v_scale)
