"""Continuous batching benchmark: transformers' ``generate_batch`` vs flux's ``Engine`` (bf16 and INT8 KV), one
process, one GPU. Llama-3-8B shape, random weights, bf16; 256 requests of 128 prompt and 256 output tokens
submitted at once (EOS ignored, so every request produces all its tokens). transformers runs the model as loaded;
the engine runs it after ``flux_infer.optimize(model, level="O1")`` (fused norms/activations and projections).

    python benchmarks/engine.py                        # all modes
    python benchmarks/engine.py --requests 32 --layers 4 --modes flux_engine   # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flux_infer  # noqa: E402
from benchmarks.decode import build_model  # noqa: E402
from flux_infer.engine import Engine  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_hf(model, prompts: list[list[int]], new_tokens: int) -> dict:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    model.generate_batch(prompts[:4], generation_config=config)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"output_tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens}


def profile_decode(engine: Engine, prompts: list[list[int]], new_tokens: int, steps: int = 5) -> str:
    """Kernel and host time of a few decode steps at full batch (after every prompt is prefilled)."""
    for p in prompts:
        engine.add_request(p, max_new_tokens=new_tokens, stop_token_ids=[])
    while engine.waiting or any(r.num_computed < len(r.prompt_ids) for r in engine.running.values()):
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=48)


def run_flux(model, prompts: list[list[int]], new_tokens: int, *, int8: bool, kv_bytes: int | None,
             profile: bool = False) -> dict:
    engine = Engine(model, None, kv_cache_bytes=kv_bytes, int8_kv=int8, max_num_batched_tokens=4096,
                    max_num_seqs=len(prompts))
    warmup_s = engine.warmup()  # kernels compiled, decode graphs captured (a server's start-up)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ids = [engine.add_request(p, max_new_tokens=new_tokens, stop_token_ids=[]) for p in prompts]
    step_ms: list[tuple[int, float]] = []  # (sequences in the step, wall ms) of steps with no prefill
    while engine.has_unfinished():
        prefilling = bool(engine.waiting) or any(r.num_computed < len(r.prompt_ids) for r in engine.running.values())
        batch, begin = len(engine.running), time.perf_counter()
        engine.step()
        if not prefilling:
            step_ms.append((batch, (time.perf_counter() - begin) * 1e3))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    requests = [engine.requests[i] for i in ids]
    metrics = [r.metrics() for r in requests]
    tokens = sum(m["completion_tokens"] for m in metrics)
    ttft = [m["ttft_ms"] for m in metrics]
    tpot = [m["tpot_ms"] for m in metrics if m["tpot_ms"] is not None]
    sequence_len = len(prompts[0]) + new_tokens
    result = {
        "output_tok_s": tokens / seconds, "warmup_s": warmup_s, "seconds": seconds, "tokens": tokens,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
        "kv_waste_at_peak_blocks": engine.kv_stats.waste_at_peak, "kv_peak_blocks": engine.kv_stats.peak_blocks,
        "kv_waste_max_any_step": engine.kv_stats.max_waste, "kv_blocks": engine.blocks.num_blocks,
        "kv_gib": engine.cache.nbytes / 2**30,
        "sequences_that_fit": engine.blocks.num_blocks * engine.blocks.block_size // sequence_len,
        "preemptions": sum(m["preemptions"] for m in metrics),
        "decode_steps": len(step_ms),
        "decode_step_ms_full_batch": statistics.median([ms for n, ms in step_ms if n == len(prompts)] or [0.0]),
        "prefill_phase_s": seconds - sum(ms for _, ms in step_ms) / 1e3,
    }
    if profile:
        print(profile_decode(engine, prompts, new_tokens))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="hf_generate_batch,flux_engine,flux_engine_int8")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-gib", type=float, default=None, help="KV cache budget (default: 90%% of free memory)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="print a profile of decode steps at full batch")
    args = parser.parse_args()
    model = build_model(args.layers)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 120000, (args.requests, args.prompt), generator=generator).tolist()
    kv_bytes = None if args.kv_gib is None else int(args.kv_gib * 2**30)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": __import__("transformers").__version__, "requests": args.requests,
               "prompt": args.prompt, "new_tokens": args.new}
    for mode in args.modes.split(","):
        if mode == "hf_generate_batch":
            results[mode] = run_hf(model, prompts, args.new)
        else:
            if not hasattr(model, "flux_report"):  # the engine runs on the model's modules: fuse them first (O1)
                flux_infer.optimize(model, level="O1")
                results["flux_optimizations"] = [r.name for r in model.flux_report.applied]
            results[mode] = run_flux(model, prompts, args.new, int8=mode.endswith("int8"), kv_bytes=kv_bytes,
                                     profile=args.profile)
        torch.cuda.empty_cache()
        print(mode, json.dumps(results[mode]), flush=True)
    if "hf_generate_batch" in results and "flux_engine" in results:
        results["speedup"] = results["flux_engine"]["output_tok_s"] / results["hf_generate_batch"]["output_tok_s"]
    if "flux_engine" in results and "flux_engine_int8" in results:
        results["int8_capacity_ratio"] = (results["flux_engine_int8"]["sequences_that_fit"]
                                          / results["flux_engine"]["sequences_that_fit"])
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
