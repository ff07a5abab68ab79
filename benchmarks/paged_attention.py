"""Paged decode attention microbenchmark: the Triton kernel's time and its share of memory bandwidth.

One new token per sequence, Llama-3-8B attention shape (32 query heads, 8 kv heads, head dim 128), block size 16,
blocks scattered over the pool. Bytes counted: every cached key and value read once (plus the INT8 scales).

    python benchmarks/paged_attention.py            # the shipped launch parameters
    python benchmarks/paged_attention.py --sweep    # block_n x num_warps x num_stages
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import copy_bandwidth  # noqa: E402
from benchmarks.gemv import graph_time  # noqa: E402
from flux_infer import kernels  # noqa: E402
from flux_infer.kernels import cuda, triton_paged_attention  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16


def case(sequences: int, context: int, int8: bool) -> tuple[tuple, int]:
    blocks_per_seq = -(-context // BLOCK)
    blocks = sequences * blocks_per_seq
    k = torch.randn(blocks * BLOCK, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scales = (None, None)
    if int8:
        (k, k_scale), (v, v_scale) = kernels.quantize_kv_int8(k), kernels.quantize_kv_int8(v)
        scales = (k_scale, v_scale)
    tables = torch.randperm(blocks, device="cuda").to(torch.int32).view(sequences, blocks_per_seq)
    lens = torch.full((sequences,), context, dtype=torch.int32, device="cuda")
    starts = torch.arange(sequences + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(sequences, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    per_vector = DIM + 4 if int8 else DIM * 2
    nbytes = 2 * sequences * context * KV_HEADS * per_vector
    return (q, k, v, tables, lens, starts, BLOCK, DIM**-0.5, 0, *scales), nbytes


def time_us(args: tuple) -> float:
    """GPU time of one call, in microseconds: 20 calls captured in a CUDA graph (no launch overhead)."""
    return graph_time(lambda _: kernels.paged_attention(*args), calls=20) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    assert cuda.load() and kernels.implementation("paged_attention", "cuda") == "triton"
    copy_gbs = copy_bandwidth()
    configs = [dict(triton_paged_attention.DECODE_CONFIG)]  # the shipped parameters first
    if args.sweep:
        configs += [dict(block_n=b, num_warps=w, num_stages=s)
                    for b, w, s in itertools.product((16, 32, 64), (2, 4, 8), (2, 3, 4))]
    rows = []
    print(f"{torch.cuda.get_device_name()}  copy {copy_gbs:.0f} GB/s")
    for sequences, context, int8 in itertools.product((256, 32, 4), (128, 384, 2048), (False, True)):
        if sequences * context > 256 * 2048:
            continue
        call, nbytes = case(sequences, context, int8)
        timed = []
        for config in configs:
            triton_paged_attention.DECODE_CONFIG.update(config)
            timed.append((time_us(call), config))
        triton_paged_attention.DECODE_CONFIG.update(configs[0])
        us, config = min(timed, key=lambda t: t[0])
        row = {"sequences": sequences, "context": context, "int8": int8, "shipped_us": timed[0][0],
               "shipped_pct_copy": 100 * nbytes / timed[0][0] / 1e3 / copy_gbs, "best_us": us,
               "best_pct_copy": 100 * nbytes / us / 1e3 / copy_gbs, "best_config": config}
        rows.append(row)
        print(f"S={sequences:<4} ctx={context:<5} {'int8' if int8 else 'bf16'}  shipped {timed[0][0]:7.1f} us "
              f"{row['shipped_pct_copy']:5.1f}% of copy | best {us:7.1f} us {row['best_pct_copy']:5.1f}%  {config}",
              flush=True)
        del call
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "copy_gb_s": copy_gbs,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
