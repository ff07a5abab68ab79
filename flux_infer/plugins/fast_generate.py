"""``fast_generate``: ``model.generate`` on flux's decode loop (static KV cache, CUDA-graph decode step).

Only the instance's ``generate`` is rebound (through the recorder); ``model(...)`` and every other method stay
transformers'. Calls with options the loop does not implement fall back to transformers' generate.
"""

from __future__ import annotations

from typing import Any

import torch

from flux_infer import kernels
from flux_infer.generation.decoder import FluxDecoder
from flux_infer.generation.generate import flux_generate
from flux_infer.generation.paged import PagedDecoder
from flux_infer.generation.runner import DecoderRunner, runner_support
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.support import Support


class FastGeneratePlugin(Plugin):
    name = "fast_generate"
    description = "model.generate on flux's decode loop: static KV cache, CUDA-graph decode step, on-device sampling"
    provides = frozenset({"decoding"})
    # The runner holds the modules it finds at apply time: everything that swaps modules goes first.
    after = ("weights:quantized", "attention", "kernels:rms_norm", "kernels:gated_activation",
             "weights:fused_projections", "kv_cache", "kv_cache:int8")
    config_field = "fast_generate"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        assert ctx.adapter is not None
        if not hasattr(model, "generate") or not hasattr(model, "_prepare_generation_config"):
            return Support.no("the model has no transformers generate() to replace")
        return runner_support(model, ctx.adapter)

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        assert ctx.adapter is not None
        runner = DecoderRunner(model, ctx.adapter)
        layout = ctx.shared.get("kv_cache")  # set by paged_kv_cache / kv_cache_int8
        if layout is None:
            decoder = FluxDecoder(runner, use_cuda_graphs=ctx.config.use_cuda_graphs)
            ctx.detail("kv_cache", "static")
        else:
            decoder = PagedDecoder(runner, block_size=layout.block_size, int8=layout.int8)
            ctx.detail("kv_cache", "paged-int8" if layout.int8 else "paged")
        original = model.generate

        def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
            return flux_generate(self, decoder, original, *args, **kwargs)

        generate.__doc__ = flux_generate.__doc__
        ctx.patch.bind_method(model, "generate", generate)
        ctx.patch.on_rollback("release the decode cache", decoder.release)
        ctx.detail("cuda_graphs", decoder.use_cuda_graphs)
        static_ops = ("rotary_cache_write_", "cache_attention", "rotary_cache_attention")  # prefill, decode
        ops = static_ops if layout is None else ("rotary_embedding_", "paged_attention")
        for op in (*ops, "add_rms_norm"):
            ctx.use_kernel(op, kernels.implementation(op, ctx.device))
        if runner.fuses_norms_on(ctx.device):  # INT4 decode steps: the norms inside the quantized layers
            ctx.detail("norms_in_int4_layers", True)
            for op in ("int4_linear_add_norm", "int4_linear_norm_scaled", "int4_gated_linear_norm_scaled"):
                ctx.use_kernel(op, kernels.implementation(op, ctx.device))
