"""The read-bandwidth floor of a decode step's layers: how long a plain streaming read of each quantized linear
layer's bytes takes on this GPU (a Triton sum over the bytes), timed like benchmarks/gemv.py (a CUDA graph of 32
calls over buffers rotated through 512 MiB, so nothing is served from L2).

    python benchmarks/read_floor.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemv import graph_time  # noqa: E402

# bytes of the INT4 (group 128) layers of a Llama-3-8B decode step: codes + bf16 scales and mins
LAYERS = {"q/o 4096x4096": (4096, 4096), "qkv 6144x4096": (6144, 4096), "gate_up 28672x4096": (28672, 4096),
          "down 4096x14336": (4096, 14336), "lm_head 128256x4096": (128256, 4096)}


@triton.jit
def _read_kernel(X, Out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(X + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(Out + pid, tl.xor_sum(acc, 0))


def read(x: torch.Tensor, out: torch.Tensor, block: int, iters: int, warps: int) -> None:
    n = x.numel()
    _read_kernel[(triton.cdiv(n, block * iters),)](x, out, n, BLOCK=block, ITERS=iters, num_warps=warps)


def main() -> int:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for name, (n, k) in LAYERS.items():
        nbytes = n * k // 2 + 2 * 2 * n * (k // 128)
        words = nbytes // 4
        copies = max(2, (512 << 20) // nbytes)
        bufs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
        out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
        results = []
        for block, iters, warps in [(1024, 4, 4), (2048, 4, 8), (4096, 2, 8), (1024, 8, 4), (2048, 8, 8),
                                    (4096, 4, 16), (8192, 2, 16)]:
            us = graph_time(lambda i: read(bufs[i % copies], out, block, iters, warps)) * 1e6
            results.append((us, block, iters, warps))
        us, block, iters, warps = min(results)
        print(f"{name:<22} {nbytes / 1e6:8.1f} MB  best {us:7.2f} us  {nbytes / us / 1e3:7.0f} GB/s  "
              f"(block {block}, iters {iters}, warps {warps}); all: " +
              ", ".join(f"{r[0]:.1f}" for r in results))
        del bufs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
