"""Decode attention over the static KV cache, one launch against three: ``flux::rotary_cache_attention`` (rotary
embedding, cache write, attention and merge in one kernel) vs the rotary kernel then the Triton split-K attention
and its merge, each call on its own layer's cache as in a decode step (Llama-3-8B attention shape: 32 query heads,
8 kv heads, head dim 128, bf16), 32 calls per CUDA graph.

    python benchmarks/decode_attention.py                   # the shipped launch choice
    python benchmarks/decode_attention.py --sweep           # blocks per (row, kv head) x warps per block
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemv import graph_time  # noqa: E402
from flux_infer import kernels  # noqa: E402
from flux_infer.kernels import cuda  # noqa: E402

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 32


def case(batch: int, context: int) -> tuple[list, tuple]:
    """Per-layer caches holding ``context`` tokens per row (this step writes the last one), and one step's q/k/v."""
    slots = context + 8
    caches = [[torch.randn(batch, KV_HEADS, slots, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
              for _ in range(LAYERS)]
    qkv = torch.randn(batch, 1, HEADS + 2 * KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([HEADS, KV_HEADS, KV_HEADS], dim=2)
    table = torch.randn(slots, DIM, device="cuda")
    positions = torch.full((batch, 1), context - 1, device="cuda")
    where = torch.tensor([context - 1], device="cuda")
    start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    end = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return caches, (q, k, v, table, table.flip(0).contiguous(), positions, where, start, end)


def fused(caches: list, step: tuple):
    q, k, v, cos, sin, positions, where, start, end = step
    return lambda i: kernels.rotary_cache_attention(q, k, v, cos, sin, positions, *caches[i], where, start, end,
                                                    DIM**-0.5, 0)


def apart(caches: list, step: tuple):
    q, k, v, cos, sin, positions, where, start, end = step

    def call(i: int) -> torch.Tensor:
        kernels.rotary_cache_write_(q, k, v, cos, sin, positions, *caches[i], where)
        return kernels.cache_attention(q, *caches[i], start, end, DIM**-0.5, 0)

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--context", default="256,384,1024,4096")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    assert cuda.load(), cuda.status()
    launches = [(0, 0)]
    if args.sweep:
        launches += list(itertools.product((1, 2, 3, 4, 8), (4, 8)))
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    rows = []
    for batch, context in itertools.product(map(int, args.batch.split(",")), map(int, args.context.split(","))):
        caches, step = case(batch, context)
        kv_bytes = 2 * batch * KV_HEADS * context * DIM * 2
        row = {"batch": batch, "context": context, "apart_us": graph_time(apart(caches, step), LAYERS) * 1e6}
        for launch in launches:
            cuda.ROTARY_ATTENTION_LAUNCH = launch
            row[f"fused_{launch[0]}x{launch[1]}_us"] = graph_time(fused(caches, step), LAYERS) * 1e6
        cuda.ROTARY_ATTENTION_LAUNCH = (0, 0)
        best = min((v, key) for key, v in row.items() if key.startswith("fused"))
        print(f"batch {batch:>2} context {context:>5}: apart {row['apart_us']:6.2f} us, fused (chosen) "
              f"{row['fused_0x0_us']:6.2f} us, best {best[1]} {best[0]:6.2f} us "
              f"({kv_bytes / best[0] / 1e3:6.0f} GB/s of cache)", flush=True)
        rows.append(row)
        del caches
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
