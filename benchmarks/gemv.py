"""Linear layers at decode batch sizes: cuBLAS (F.linear) vs flux's GEMV, Llama-3-8B shapes, as % of the copy
bandwidth measured in the same run. Each timing is a CUDA graph of 32 calls over weights rotated through more
memory than the L2 cache holds.

    python benchmarks/gemv.py                    # bf16: cuBLAS vs flux's GEMV
    python benchmarks/gemv.py --quant [--sweep] [--rows 8,16] [--launch-shapes 0,2] [--shapes down,lm_head] [--gated]
                              [--frag]
                                                 # INT8 / INT4 vs bf16 cuBLAS
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import copy_bandwidth  # noqa: E402
from flux_infer import kernels  # noqa: E402
from flux_infer.kernels import cuda  # noqa: E402

SHAPES = {  # name: (out_features, in_features)
    "k_proj/v_proj": (1024, 4096), "q_proj/o_proj": (4096, 4096), "qkv fused": (6144, 4096),
    "gate/up": (14336, 4096), "gate_up fused": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096),
}


def graph_time(fn, calls: int = 32) -> float:
    """Seconds per call of ``fn(i)`` captured in one CUDA graph of ``calls`` calls (median of 5 replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return sorted(times)[2]


def sweep_configs(rows: int, shapes: tuple[int, ...] = (0, 1, 2)):
    """(INT4 form, launch shape, warps, row tiles) of the tensor-core kernel: INT4 biased codes (1) or per-weight
    scales (2); launch shape 0 (up to 8 warps), 1 (three blocks per SM, fewer loads in flight per warp) or 2 (up
    to 16 warps), the last two for up to 16 rows."""
    for mode in (1, 2):
        for shape in shapes:
            if shape in (1, 2) and rows > 16:
                continue
            for warps in (8, 16) if shape == 2 else (4, 8):
                for tiles in (1, 2, 4):
                    yield mode, shape, warps, tiles


def mma_time(layers: list, x: torch.Tensor, plan: tuple[int, int, int, int], act: int) -> float:
    """Seconds per call of the tensor-core kernel with launch ``plan`` (warps, row tiles, INT4 form, launch shape)
    over ``layers`` (copies of one quantized layer, rotated); ``act`` >= 0: gated."""
    module = cuda._state["module"]

    def call(i: int) -> torch.Tensor:
        layer = layers[i % len(layers)]
        scales, mins = (layer.scale, None) if layer.bits == 8 else (layer.scales, layer.mins)
        return module.quant_mma(x, layer.qweight, scales, mins, layer.group_size or 0, None, *plan, act)

    return graph_time(call)


def quantized(bandwidth: float, sweep: bool, rows_measured: tuple[int, ...],
              shapes: tuple[int, ...] = (0, 1, 2), names: tuple[str, ...] = tuple(SHAPES), gated: bool = False,
              frag: bool = False, epilogue: str = "plain") -> None:
    """Weight-only INT8 / INT4 (group 128) linear layers against bf16 cuBLAS, same shapes. With ``sweep``, every
    warp count / row tiling of the tensor-core kernel too (the launcher's heuristic picks one of them). ``gated``:
    the quantized layers as decode runs a fused gate/up layer, SiLU(gate) * up in the epilogue (half as wide).
    ``frag``: INT4 in the fragment layout too (``fragment_times``, with ``epilogue``)."""
    from flux_infer.quantization.modules import QuantizedLinear

    act = 0 if gated else -1
    print(f"{'shape':>14} {'rows':>4} {'bf16 us':>8} {'int8 us':>8} {'%bw':>5} {'int4 us':>8} {'%bw':>5} "
          f"{'int4 speedup':>12}")
    for name, (n, k) in SHAPES.items():
        if name == "k_proj/v_proj" or name not in names:
            continue
        copies = max(1, -(-(512 * 2**20) // (n * k * 2)))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        int8 = [QuantizedLinear.from_weight(w, None, bits=8, group_size=None) for w in dense]
        int4 = [QuantizedLinear.from_weight(w, None, bits=4, group_size=128) for w in dense]
        nbytes8 = n * k + n * 2
        nbytes4 = n * k // 2 + 2 * n * (k // 128) * 2
        pct = lambda b, t: 100 * b / t / 1e9 / bandwidth  # noqa: E731
        for rows in rows_measured:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            t16 = graph_time(lambda i: F.linear(x, dense[i % copies]))
            if gated:  # the launcher's own plan (warps, row tiles, form and launch shape left to it)
                t8, t4 = mma_time(int8, x, cuda.AUTO_PLAN, act), mma_time(int4, x, cuda.AUTO_PLAN, act)
            else:
                t8 = graph_time(lambda i: int8[i % copies](x))
                t4 = graph_time(lambda i: int4[i % copies](x))
            print(f"{name:>14} {rows:>4} {t16 * 1e6:>8.1f} {t8 * 1e6:>8.1f} {pct(nbytes8, t8):>5.1f} "
                  f"{t4 * 1e6:>8.1f} {pct(nbytes4, t4):>5.1f} {t16 / t4:>12.2f}", flush=True)
            if not sweep:
                continue
            for mode, shape, warps, tiles in sweep_configs(rows, shapes):
                plan = (warps, tiles, mode, shape)
                t8, t4 = mma_time(int8, x, plan, act), mma_time(int4, x, plan, act)
                label = f"m{mode} l{shape} w{warps} t{tiles}"
                print(f"{label:>14} {rows:>4} {'':>8} {t8 * 1e6:>8.1f} {pct(nbytes8, t8):>5.1f} "
                      f"{t4 * 1e6:>8.1f} {pct(nbytes4, t4):>5.1f}", flush=True)
        if frag:
            fragment_times(int4, k, rows_measured, act, sweep, lambda t: pct(nbytes4, t), epilogue)
        del dense, int8, int4
        torch.cuda.empty_cache()


def fragment_times(layers: list, k: int, rows_measured: tuple[int, ...], act: int, sweep: bool, pct,
                   epilogue: str = "plain") -> None:
    """The same INT4 layers reordered into the fragment layout (int4_fragments) on ``csrc/quant_frag.cu``: the
    launcher's own plan, and with ``sweep`` every (warps, K split) it takes (r8 / r16: the kernel for up to 8
    rows with 8 or 16 warps a block). ``epilogue``: "norm-scaled" (the
    layer after an RMSNorm as wide as K, its sums scaled per row) or "add-norm" (the layer before one: residual
    add, normed output and sums of squares), as norm-fused decode steps run them."""
    from flux_infer.kernels import quant_frag

    module = cuda._state["module"]
    for layer in layers:
        layer.set_fragments(True)
    counters = quant_frag.counters(layers[0].qweight.device)
    n = layers[0].qweight.shape[0]
    plans = [(0, 0)] + ([(w, s) for w in (2, 8) for s in (1, 2, 4, 8, 16)] + [(-8, 1), (-16, 1)] if sweep else [])
    for rows in rows_measured:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        partials = torch.rand(rows, k // 32, device="cuda") * 20 if epilogue == "norm-scaled" else None
        residual = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) if epilogue == "add-norm" else None
        norm_weight = torch.rand(n, device="cuda").bfloat16() + 0.5 if epilogue == "add-norm" else None
        for warps, split in plans:
            if (split and (k // 128) < split) or (warps == 8 and act >= 0) or (warps < 0 and rows > 8):
                continue

            def call(i: int, warps=warps, split=split) -> torch.Tensor:
                layer = layers[i % len(layers)]
                return module.quant_frag(x, layer.qweight, layer.scales, layer.mins, None, act, partials, 1e-5,
                                         residual, norm_weight, counters, warps, split)[0]

            t = graph_time(call)
            plan = "auto" if not warps else f"r{-warps}" if warps < 0 else f"w{warps} s{split}"
            label = f"int4f {plan}" + {"plain": "", "norm-scaled": " ns", "add-norm": " an"}[epilogue]
            print(f"{label:>14} {rows:>4} {'':>8} {'':>8} {'':>5} {t * 1e6:>8.1f} {pct(t):>5.1f}", flush=True)


def integers(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", action="store_true", help="INT8 / INT4 kernels vs bf16 cuBLAS")
    parser.add_argument("--sweep", action="store_true", help="with --quant: every launch the kernel accepts too")
    parser.add_argument("--rows", type=integers, default=(1, 4, 8, 16, 32), help="with --quant: e.g. 8,16")
    parser.add_argument("--launch-shapes", type=integers, default=(0, 1, 2), help="with --sweep: e.g. 0,2")
    parser.add_argument("--gated", action="store_true",
                        help="with --quant: the layers as gated ones (SiLU(gate) * up in the epilogue), as decode runs "
                             "the fused gate/up layer")
    parser.add_argument("--frag", action="store_true",
                        help="with --quant: INT4 in the fragment layout (int4_fragments) too, csrc/quant_frag.cu")
    parser.add_argument("--epilogue", choices=["plain", "norm-scaled", "add-norm"], default="plain",
                        help="with --frag: the fragment kernel's epilogue (norm-scaled: after an RMSNorm; add-norm: "
                             "before one; labels ns / an)")
    parser.add_argument("--shapes", type=lambda text: tuple(text.split(",")), default=tuple(SHAPES),
                        help=f"with --quant: a comma-separated subset of {', '.join(SHAPES)}")
    args = parser.parse_args()
    if not set(args.launch_shapes) <= {0, 1, 2} or not all(1 <= r <= 32 for r in args.rows):
        parser.error("launch shapes are 0, 1 or 2 and rows 1 to 32")
    if not set(args.shapes) <= set(SHAPES):
        parser.error(f"shapes are among: {', '.join(SHAPES)}")
    if args.epilogue == "add-norm" and args.gated:
        parser.error("--epilogue add-norm is for plain layers (a gated layer does not feed a norm)")
    assert cuda.load(), cuda.status()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  copy {bandwidth:.0f} GB/s")
    if args.quant:
        quantized(bandwidth, sweep=args.sweep, rows_measured=args.rows, shapes=args.launch_shapes, names=args.shapes,
                  gated=args.gated, frag=args.frag, epilogue=args.epilogue)
        return 0
    print(f"{'shape':>14} {'rows':>4} {'cuBLAS us':>10} {'%bw':>5} {'flux us':>9} {'%bw':>5} {'speedup':>7}")
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(1, -(-(512 * 2**20) // nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            t_cublas = graph_time(lambda i: F.linear(x, weights[i % copies]))
            t_flux = graph_time(lambda i: kernels.linear(x, weights[i % copies], None)) if rows <= 8 else float("nan")
            pct = lambda t: 100 * nbytes / t / 1e9 / bandwidth  # noqa: E731
            print(f"{name:>14} {rows:>4} {t_cublas * 1e6:>10.1f} {pct(t_cublas):>5.1f} {t_flux * 1e6:>9.1f} "
                  f"{pct(t_flux):>5.1f} {t_cublas / t_flux:>7.2f}", flush=True)
        del weights
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
