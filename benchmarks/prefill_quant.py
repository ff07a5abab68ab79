"""Quantized linear layers at prefill sizes: the Triton dequantize-in-the-loop matmul vs dequantizing the weight
(flux's kernel) and running cuBLAS on it, against bf16 cuBLAS, Llama-3-8B shapes. Sets where
``flux_infer.kernels.cuda.DEQUANT_MATMUL_MIN_ROWS`` belongs (INT4 and INT8 apart). Each timing is a CUDA graph of 8 calls.

    python benchmarks/prefill_quant.py [--rows 33,64,128,256,512,2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemv import graph_time  # noqa: E402
from flux_infer.kernels import cuda, triton_quant  # noqa: E402
from flux_infer.quantization.modules import QuantizedLinear  # noqa: E402

SHAPES = {"qkv fused": (6144, 4096), "o_proj": (4096, 4096), "gate_up fused": (28672, 4096), "down": (4096, 14336)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="33,64,128,256,512,2048")
    args = parser.parse_args()
    assert cuda.load(), cuda.status()
    module = cuda._state["module"]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds per call")
    print(f"{'layer':>14} {'rows':>5} {'bf16':>8} {'i8 triton':>10} {'i8 deq+mm':>10} {'i4 triton':>10} "
          f"{'i4 deq+mm':>10} {'i4 dequant':>10}")
    totals: dict[int, list[float]] = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        int8 = QuantizedLinear.from_weight(w, None, bits=8, group_size=None)
        int4 = QuantizedLinear.from_weight(w, None, bits=4, group_size=128)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            times = [
                graph_time(lambda i: F.linear(x, w), calls=8),
                graph_time(lambda i: triton_quant.quant_matmul(x, int8.qweight, int8.scale, None, 0, None), calls=8),
                graph_time(lambda i: F.linear(x, module.dequantize_weight(int8.qweight, int8.scale, None, 0)), calls=8),
                graph_time(lambda i: triton_quant.quant_matmul(x, int4.qweight, int4.scales, int4.mins, 128, None),
                           calls=8),
                graph_time(lambda i: F.linear(x, module.dequantize_weight(int4.qweight, int4.scales, int4.mins, 128)),
                           calls=8),
                graph_time(lambda i: module.dequantize_weight(int4.qweight, int4.scales, int4.mins, 128), calls=8),
            ]
            totals.setdefault(rows, [0.0] * len(times))
            totals[rows] = [a + b for a, b in zip(totals[rows], times, strict=True)]
            print(f"{name:>14} {rows:>5} " + " ".join(f"{t * 1e6:>{10 if j else 8}.1f}" for j, t in enumerate(times)),
                  flush=True)
        del w, int8, int4
        torch.cuda.empty_cache()
    for rows, times in totals.items():
        print(f"{'layer total':>14} {rows:>5} " + " ".join(f"{t * 1e6:>{10 if j else 8}.1f}"
                                                         for j, t in enumerate(times)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
