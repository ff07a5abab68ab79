"""Where a flux O1 decode step spends its GPU time: the top kernels of 32 decode steps (torch.profiler).

    python benchmarks/profile_decode.py --batch 1 --layers 32 [--graphs] [--quantization int4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flux_infer  # noqa: E402
from benchmarks.decode import build_model  # noqa: E402


def profiled_generate(layers: int, batch: int, steps: int, quantization: str | None,
                      graphs: bool, plugins: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
                      ) -> torch.profiler.profile:
    """The CUDA activity of one ``generate`` of ``steps`` tokens (128-token prompts) by a flux O1 model of the
    Llama-3-8B shape, after a warm-up call (graph capture, autotuning); ``plugins`` / ``exclude``: plugins to add /
    leave out by name."""
    model = build_model(layers)
    config = flux_infer.InferenceConfig(optimization_level="O1", use_cuda_graphs=graphs, quantization=quantization,
                                        quantize_lm_head=quantization is not None, plugins=list(plugins),
                                        exclude=list(exclude))
    flux_infer.optimize(model, config=config)
    ids = torch.randint(100, 120000, (batch, 128), device="cuda")
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, temperature=None, top_p=None,
                  top_k=None)
    model.generate(input_ids=ids, **kwargs)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.generate(input_ids=ids, **kwargs)
        torch.cuda.synchronize()
    return prof


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=False,
                        help="profile the graph replays (kernels only) instead of the eager step")
    parser.add_argument("--quantization", default=None, choices=["int8", "int4"],
                        help="weight-only quantization (lm_head included), as benchmarks/decode.py's flux_int8/int4")
    args = parser.parse_args()
    prof = profiled_generate(args.layers, args.batch, args.steps, args.quantization, args.graphs)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
