"""Decode benchmark: transformers eager, transformers static cache + torch.compile, and flux O1, in one process.

Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256), random
weights, bf16, prompt 128 tokens, 256 new tokens (greedy, EOS ignored). Reports decode tok/s, TTFT, peak memory
and percent of the memory-bandwidth roofline, with the copy bandwidth measured in the same run.

    python benchmarks/decode.py                       # all modes, batch 1, 8, 32
    python benchmarks/decode.py --modes flux --batch 1 --layers 4   # quick look
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
from flux_infer import kernels  # noqa: E402
from flux_infer.generation import cache as cache_module  # noqa: E402
from flux_infer.generation import generate as generate_module  # noqa: E402
from flux_infer.generation import norm_fusion  # noqa: E402
from flux_infer.generation.runner import DecoderRunner  # noqa: E402
from flux_infer.kernels import cuda as cuda_kernels  # noqa: E402
from flux_infer.kernels import matmul as linear_module  # noqa: E402
from flux_infer.plugins import int4_fragments  # noqa: E402
from flux_infer.plugins.fused_kernels import FluxGatedMLP  # noqa: E402

FLUX_MODES = {
    "flux": flux_infer.InferenceConfig(optimization_level="O1"),
    "flux_cublas": flux_infer.InferenceConfig(optimization_level="O1"),
    "flux_int8": flux_infer.InferenceConfig(optimization_level="O1", quantization="int8", quantize_lm_head=True),
    "flux_int4": flux_infer.InferenceConfig(optimization_level="O1", quantization="int4", quantize_lm_head=True),
}
# the same with flux's kernels launched without programmatic dependent launch (an A/B of that launch mode)
FLUX_MODES.update({f"{mode}_nopdl": config for mode, config in list(FLUX_MODES.items()) if mode != "flux_cublas"})
# quantized, with the gate/up layer and act_mul as two kernels (an A/B of the gated epilogue)
FLUX_MODES.update({f"{mode}_unfused": FLUX_MODES[mode] for mode in ("flux_int8", "flux_int4")})
# dependents launched after the linear layers' and attention's main loops instead of from their start (an A/B of
# flux_infer.kernels.cuda.early_trigger)
FLUX_MODES.update({f"{mode}_late": FLUX_MODES[mode] for mode in ("flux", "flux_int8", "flux_int4")})
# INT4 with the fused q/k/v layer (6144 x 4096) on biased codes up to 8 rows, the launch plan before 2026-11-27's
# change (an A/B through flux_infer.kernels.cuda.QUANT_MMA_PLANS)
FLUX_MODES["flux_int4_qkvbiased"] = FLUX_MODES["flux_int4"]
# INT4 with the launch plans given by --plans (a tuning A/B through QUANT_MMA_PLANS)
FLUX_MODES["flux_int4_plans"] = FLUX_MODES["flux_int4"]
# greedy tokens selected by the host-driven loop step by step, instead of inside the captured decode graphs (an
# A/B of flux_infer.generation.generate.GREEDY_ON_DEVICE)
FLUX_MODES.update({f"{mode}_hostgreedy": FLUX_MODES[mode] for mode in ("flux", "flux_int8", "flux_int4")})
# rotary embedding + cache write, then split-K attention and its merge, as three launches per layer instead of
# flux::rotary_cache_attention's one (an A/B of flux_infer.generation.cache.FUSED_ROTARY_ATTENTION)
FLUX_MODES.update({f"{mode}_attnapart": FLUX_MODES[mode] for mode in ("flux", "flux_int8", "flux_int4")})
# NOT A RESULT, A BOUND: the residual add + RMSNorm of every layer replaced by a pass-through without a kernel
# (kernels.add_rms_norm returns (x, x)), so the values are wrong and the step is otherwise the same: what removing
# those 64 launches could gain at most (docs/benchmarks.md, ninth session)
FLUX_MODES.update({f"{mode}_nonorm": FLUX_MODES[mode] for mode in ("flux", "flux_int4")})
# INT4 decode steps with a norm kernel between the quantized layers, instead of the norms split into the layers
# around them (an A/B of flux_infer.generation.runner.DecoderRunner.fuse_norms; the *_nonorm bound runs this way)
FLUX_MODES["flux_int4_normapart"] = FLUX_MODES["flux_int4"]
# quantized, with every prefill matmul on the Triton dequantize-in-the-loop kernel (an A/B of
# flux_infer.kernels.cuda.DEQUANT_MATMUL_MIN_ROWS: cuBLAS on the dequantized weight)
FLUX_MODES.update({f"{mode}_triton_prefill": FLUX_MODES[mode] for mode in ("flux_int8", "flux_int4")})
# INT4 in the checkpoint layout: the int4_fragments plugin (on by default with INT4 on CUDA since the nineteenth
# session, so flux_int4 and its variants run it) excluded
FLUX_MODES["flux_int4_checkpoint"] = flux_infer.InferenceConfig(optimization_level="O1", quantization="int4",
                                                                quantize_lm_head=True, exclude=["int4_fragments"])
# INT4 with the layers in the fragment layout (the int4_fragments plugin, named); A/Bs of its layers
# (flux_infer.plugins.int4_fragments.ROLES: _nodown keeps down in the checkpoint layout, _qkv and _qkvo add q/k/v and
# o) and of the fragment calls' launches (flux_infer.kernels.cuda.set_frag_launch: _fragplain launches every call
# above one row plainly, _fragpdl every call programmatically, _fraglate triggers the small layers' dependents after
# their main loop)
FLUX_MODES["flux_int4_frag"] = flux_infer.InferenceConfig(optimization_level="O1", quantization="int4",
                                                          quantize_lm_head=True, plugins=["int4_fragments"])
FRAGMENT_ROLE_MODES = {"_nodown": ("gate_up", "lm_head"), "_qkv": ("qkv", "gate_up", "down", "lm_head"),
                       "_qkvo": ("qkv", "o", "gate_up", "down", "lm_head"), "_mlp": ("gate_up", "down", "lm_head")}
# set_frag_launch's arguments by form (also timeline_decode.py --frag-launch), and the mode suffix of each form
FRAG_LAUNCH_FORMS = {"default": {}, "plain": {"programmatic_bytes": 0}, "late": {"early": False},
                     "programmatic": {"all_programmatic": True}}
FRAG_LAUNCH_SUFFIXES = {"_fragplain": "plain", "_fragpdl": "programmatic", "_fraglate": "late"}
FLUX_MODES.update({f"flux_int4_frag{roles}{launch}": FLUX_MODES["flux_int4_frag"] for roles in FRAGMENT_ROLE_MODES
                   for launch in ("", *FRAG_LAUNCH_SUFFIXES)})
# every layer around a norm on fragments, whose kernel has the norm epilogues at 16 rows: steps of up to 16 tokens
# without norm kernels; the plugin's default since the seventeenth session (norm_fusion.FRAGMENT_MAX_ROWS), so these
# names now run what flux_int4_frag runs (kept for the commands docs/benchmarks.md records)
FLUX_MODES.update({f"flux_int4_frag_qkvo_norm16{launch}": FLUX_MODES["flux_int4_frag"]
                   for launch in ("", *FRAG_LAUNCH_SUFFIXES)})
# the fragment layers' norm epilogues only up to 8 rows, as on the checkpoint layout (an A/B of
# flux_infer.generation.norm_fusion.FRAGMENT_MAX_ROWS: at 16 rows the norm kernels run)
FLUX_MODES["flux_int4_frag_norm8"] = FLUX_MODES["flux_int4_frag"]
# every kernel over up to 16 rows lets its dependents launch from its start (flux_infer.kernels.cuda.set_early_trigger's
# max_rows; the default is one row), with the fragment calls' default or programmatic launches
FLUX_MODES.update({f"flux_int4_frag_early16{launch}": FLUX_MODES["flux_int4_frag"] for launch in ("", "_fragpdl")})
# the same with --frag-plans' (warps, K splits) for the fragment calls (an A/B of flux_infer.kernels.cuda.FRAG_PLANS)
FLUX_MODES.update({f"{mode}_fplans": FLUX_MODES["flux_int4_frag"] for mode in ("flux_int4_frag",
                                                                               "flux_int4_frag_qkvo_norm16")})


default_add_norm = kernels.add_rms_norm
default_fragment_roles = int4_fragments.ROLES
default_fragment_norm_rows = norm_fusion.FRAGMENT_MAX_ROWS


def set_frag_launch_form(form: str) -> None:
    """The fragment kernel's launches above one row in one of ``FRAG_LAUNCH_FORMS``."""
    cuda_kernels.set_frag_launch(**FRAG_LAUNCH_FORMS[form])


def _pass_through_add_norm(x, residual, weight, eps, weight_offset):  # the *_nonorm modes' stand-in (wrong values)
    return x, x


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def copy_bandwidth(gib: float = 4.0, repeats: int = 20) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written (median of repeats)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(times) / 1e9


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def timed_generate(model, input_ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(model, batch: int, prompt: int, new: int, repeats: int) -> dict:
    ids = torch.randint(100, 120000, (batch, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    timed_generate(model, ids, new)  # warm-up (compilation, graph capture, autotuning)
    timed_generate(model, ids, 1)
    torch.cuda.reset_peak_memory_stats()
    ttft = statistics.median(timed_generate(model, ids, 1)[0] for _ in range(repeats))
    totals, out = [], None
    for _ in range(repeats):
        seconds, out = timed_generate(model, ids, new)
        totals.append(seconds)
    total = statistics.median(totals)
    decode_seconds = max(total - ttft, 1e-9)
    return {
        "batch": batch, "ttft_ms": ttft * 1e3, "total_s": total,
        "decode_tok_s": batch * (new - 1) / decode_seconds, "e2e_tok_s": batch * new / total,
        "ms_per_step": decode_seconds / (new - 1) * 1e3, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tokens": out[:, prompt:].cpu(),
    }


def set_programmatic_launch(enabled: bool) -> None:
    from flux_infer.kernels import cuda

    if cuda.load():
        cuda._state["module"].set_programmatic_launch(enabled)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters, bytes a decode step must read: everything but the embedding table)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    return total, total - embed.numel() * embed.element_size()


def parse_plans(text: str) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """``"28672x4096=8,2,1,1;..."`` as ``{(28672, 4096): (8, 2, 1, 1), ...}``."""
    plans = {}
    for item in filter(None, text.split(";")):
        shape, _, plan = item.partition("=")
        out_features, _, in_features = shape.partition("x")
        values = tuple(int(v) for v in plan.split(","))
        if len(values) != 4:
            raise argparse.ArgumentTypeError(f"{item!r}: a plan is warps,row_tiles,int4_form,launch_shape")
        plans[(int(out_features), int(in_features))] = values
    return plans


def parse_frag_plans(text: str) -> dict[tuple[int, int, str], tuple[int, int]]:
    """``"4096x4096/add_norm=2,4;..."`` as ``{(4096, 4096, "add_norm"): (2, 4), ...}`` (cuda.FRAG_PLANS)."""
    plans = {}
    for item in filter(None, text.split(";")):
        key, _, plan = item.partition("=")
        shape, _, epilogue = key.partition("/")
        out_features, _, in_features = shape.partition("x")
        values = tuple(int(v) for v in plan.split(","))
        if len(values) != 2 or epilogue not in cuda_kernels.FRAG_EPILOGUES:
            raise argparse.ArgumentTypeError(f"{item!r}: OUTxIN/epilogue=warps,ksplit, epilogue one of "
                                             f"{', '.join(cuda_kernels.FRAG_EPILOGUES)}")
        plans[(int(out_features), int(in_features), epilogue)] = values
    return plans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="hf_eager,hf_static_compile,flux")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--compile-batch", default="1", help="batch sizes for hf_static_compile (compiles each)")
    parser.add_argument("--quant-batch", default="1,16", help="batch sizes for flux_int8 / flux_int4")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plans", type=parse_plans, default={},
                        help="launch plans of flux_int4_plans, e.g. '28672x4096=8,2,1,1;128256x4096=4,2,2,1': "
                             "(out x in) = warps, row tiles, INT4 form, launch shape (QUANT_MMA_PLANS, up to 8 rows)")
    parser.add_argument("--frag-plans", type=parse_frag_plans, default={},
                        help="fragment-layout calls' (warps, K splits) of the *_fplans modes, e.g. "
                             "'4096x4096/add_norm=2,4;6144x4096/norm_scaled=2,2' (cuda.FRAG_PLANS)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in FLUX_MODES and mode not in ("hf_eager", "hf_static_compile")]
    if unknown:  # an unknown name would run the model as transformers leaves it, under that name
        parser.error(f"unknown mode(s) {', '.join(unknown)}: hf_eager, hf_static_compile or one of "
                     f"{', '.join(sorted(FLUX_MODES))}")
    default_gemv_rows = linear_module.GEMV_MAX_ROWS
    default_dequant_rows = dict(cuda_kernels.DEQUANT_MATMUL_MIN_ROWS)
    batches = [int(b) for b in args.batch.split(",")]

    bandwidth = copy_bandwidth()
    model = build_model(args.layers)
    all_bytes, decode_bytes = weight_bytes(model)
    info = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "copy_gb_s": bandwidth,
        "weights_gb": all_bytes / 1e9, "decode_read_gb": decode_bytes / 1e9,
        "roofline_tok_s_all_weights": bandwidth / (all_bytes / 1e9),
        "roofline_tok_s_decode_bytes": bandwidth / (decode_bytes / 1e9), "shape": {**LLAMA3_8B,
                                                                                    "num_hidden_layers": args.layers},
        "prompt": args.prompt, "new_tokens": args.new,
    }
    print(json.dumps({k: v for k, v in info.items() if k != "shape"}, indent=1), flush=True)
    results = []
    for mode in modes:
        if mode == "hf_static_compile":
            # transformers compiles the forward itself (mode="reduce-overhead") when the cache is static
            model.generation_config.cache_implementation = "static"
        elif mode in FLUX_MODES:
            # flux_cublas: O1 with every linear layer left on cuBLAS (isolates the GEMV kernel's effect)
            linear_module.GEMV_MAX_ROWS = 0 if mode == "flux_cublas" else default_gemv_rows
            set_programmatic_launch(not mode.endswith("_nopdl"))
            FluxGatedMLP.gated_epilogue = not mode.endswith("_unfused")
            cuda_kernels.set_early_trigger(not mode.endswith("_late"), 16 if "_early16" in mode else 1)
            generate_module.GREEDY_ON_DEVICE = not mode.endswith("_hostgreedy")
            cache_module.FUSED_ROTARY_ATTENTION = not mode.endswith("_attnapart")
            DecoderRunner.fuse_norms = False if mode.endswith(("_normapart", "_nonorm")) else None
            cuda_kernels.QUANT_MMA_PLANS = ({(6144, 4096): (8, 2, 1, 1)} if mode.endswith("_qkvbiased") else
                                            dict(args.plans) if mode.endswith("_plans") else {})
            cuda_kernels.DEQUANT_MATMUL_MIN_ROWS = ({bits: 1 << 30 for bits in default_dequant_rows}
                                                    if mode.endswith("_triton_prefill") else dict(default_dequant_rows))
            if mode.endswith("_nonorm"):
                kernels.add_rms_norm = _pass_through_add_norm
            norm_fusion.FRAGMENT_MAX_ROWS = 8 if mode.endswith("_norm8") else default_fragment_norm_rows
            cuda_kernels.FRAG_PLANS = dict(args.frag_plans) if mode.endswith("_fplans") else {}
            launch_suffix = next((suffix for suffix in FRAG_LAUNCH_SUFFIXES if mode.endswith(suffix)), "")
            set_frag_launch_form(FRAG_LAUNCH_SUFFIXES.get(launch_suffix, "default"))
            roles_suffix = (mode.removeprefix("flux_int4_frag").removesuffix("_fplans").removesuffix(launch_suffix)
                            .removesuffix("_norm16").removesuffix("_norm8"))
            int4_fragments.ROLES = FRAGMENT_ROLE_MODES.get(roles_suffix, default_fragment_roles)
            flux_infer.optimize(model, config=FLUX_MODES[mode])
            print(model.flux_report, flush=True)
            info[f"{mode}_model_gb"] = model.flux_report.memory_after.model_bytes / 1e9
        for batch in batches:
            if mode == "hf_static_compile" and str(batch) not in args.compile_batch.split(","):
                continue
            if mode.startswith(("flux_int8", "flux_int4")) and str(batch) not in args.quant_batch.split(","):
                continue
            row = measure(model, batch, args.prompt, args.new, args.repeats)
            row["mode"] = mode
            row["pct_roofline_all_weights"] = 100 * row["decode_tok_s"] / info["roofline_tok_s_all_weights"] if (
                batch == 1) else None
            results.append(row)
            print(f"{mode:>18} b={batch:<3} decode {row['decode_tok_s']:8.1f} tok/s  {row['ms_per_step']:6.2f} "
                  f"ms/step  TTFT {row['ttft_ms']:6.1f} ms  peak {row['peak_gib']:5.1f} GiB", flush=True)
        if mode == "hf_static_compile":
            info["hf_compiled"] = hasattr(model, "_compiled_call")
            model.generation_config.cache_implementation = None
            model.__dict__.pop("_compiled_call", None)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        elif mode in FLUX_MODES:
            flux_infer.revert(model)
            kernels.add_rms_norm = default_add_norm
            linear_module.GEMV_MAX_ROWS = default_gemv_rows
            set_programmatic_launch(True)
            FluxGatedMLP.gated_epilogue = True
            cuda_kernels.set_early_trigger(True)
            generate_module.GREEDY_ON_DEVICE = True
            DecoderRunner.fuse_norms = None
            cuda_kernels.QUANT_MMA_PLANS = {}
            cuda_kernels.DEQUANT_MATMUL_MIN_ROWS = dict(default_dequant_rows)
            int4_fragments.ROLES = default_fragment_roles
            cuda_kernels.FRAG_PLANS = {}
            set_frag_launch_form("default")
            norm_fusion.FRAGMENT_MAX_ROWS = default_fragment_norm_rows
            torch.cuda.empty_cache()
    base = {r["batch"]: r for r in results if r["mode"] == "hf_eager"}
    for r in results:  # greedy on random weights: report agreement with eager, do not assert it
        if r["mode"] != "hf_eager" and r["batch"] in base:
            r["same_tokens_as_eager"] = float((r["tokens"] == base[r["batch"]]["tokens"]).float().mean())
    for r in results:
        r.pop("tokens")
    print(json.dumps(results, indent=1))
    print(json.dumps({"hf_compiled": info.get("hf_compiled")}))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
