"""Perplexity of SmolLM2-135M (fp32, CPU) with each weight quantization, on the first tokens of
``pydoc_data.topics`` (see docs/benchmarks.md).

    python benchmarks/quality.py --tokens 32768 --group 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flux_infer  # noqa: E402
from flux_infer.evaluation import evaluation_text, perplexity  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tokenizer = flux_infer.load("smollm2-135m", device="cpu", dtype=torch.float32)
    ids = tokenizer(evaluation_text(), return_tensors="pt")["input_ids"][0][: args.tokens]
    print(f"{ids.numel()} tokens, window {args.window}, group {args.group}, torch {torch.__version__}")
    fp32 = perplexity(base, ids, window=args.window)
    print(f"{'fp32':>9}  ppl {fp32:8.3f}", flush=True)
    for method in ("int8", "int4", "int4-awq"):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        config = flux_infer.InferenceConfig(optimization_level="O0", quantization=method,
                                            quantization_group_size=args.group)
        flux_infer.optimize(model, config=config)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, ids, window=args.window)
        print(f"{method:>9}  ppl {ppl:8.3f}  {100 * (ppl / fp32 - 1):+6.2f}%  (quantized in {seconds:.1f} s, "
              f"{model.flux_report.memory_after.model_bytes / 2**20:.0f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
