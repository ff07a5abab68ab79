"""Triton dequantize-in-the-loop matmul for weight-only INT8/INT4 at batch sizes past the GEMV's (rows > 8).

Each program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``x @ W.T``, unpacking a ``[BLOCK_K, BLOCK_N]`` tile of the
quantized weight to the activations' dtype in registers and feeding the tensor cores with ``tl.dot``: the weight
crosses memory once, in its packed form.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (CPU-only installs)
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _quant_matmul_kernel(X, W, S, MN, Bias, Out, M, N, K, stride_xm, stride_om, group,
                             INT4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        groups = K // group
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
            if INT4:
                # each packed word is loaded once and split into its 8 nibbles: [BLOCK_K // 8, 8, BLOCK_N]
                offs_p = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                packed = tl.load(W + offs_n[None, :] * (K // 8) + offs_p[:, None], mask=n_mask[None, :], other=0)
                shifts = tl.arange(0, 8) * 4
                q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
                q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32)
                g = k0 // group
                s = tl.load(S + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
                mn = tl.load(MN + offs_n * groups + g, mask=n_mask, other=0.0).to(tl.float32)
                w = (q * s[None, :] + mn[None, :]).to(x.dtype)
            else:
                q = tl.load(W + offs_n[None, :] * K + offs_k[:, None], mask=n_mask[None, :], other=0)
                w = q.to(x.dtype)
            acc += tl.dot(x, w)
        if not INT4:
            acc = acc * tl.load(S + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 group: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x ``[M, K]`` (unit stride in K) with INT8 (``mins`` None) or INT4 weights -> ``[M, N]``."""
    m, k = x.shape
    n = qweight.shape[0]
    int4 = mins is not None
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = min(64, group) if int4 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _quant_matmul_kernel[grid](
        x, qweight, scales, mins if int4 else scales, bias if bias is not None else scales, out, m, n, k,
        x.stride(0), out.stride(0), group if int4 else k,
        INT4=int4, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k,
        num_warps=4, num_stages=3,
    )
    return out
