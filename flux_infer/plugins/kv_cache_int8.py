"""``kv_cache_int8``: INT8 keys and values (one scale per token and head), dequantized inside attention.

It is the cache the model uses wherever it caches: flux's decode loop and engine (the paged INT8 pool), and the
model's own forward with ``use_cache=True`` (``Int8Cache``, transformers' cache interface).
"""

from __future__ import annotations

import dataclasses

import torch

from flux_infer.generation.hf_cache import cache_argument, int8_cache_forward
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.plugins.paged_kv_cache import KVCacheLayout, decode_loop_support
from flux_infer.support import Support


class KVCacheInt8Plugin(Plugin):
    name = "kv_cache_int8"
    description = "INT8 KV cache (about half the KV memory of bf16), dequantized inside the attention kernel"
    provides = frozenset({"kv_cache:int8"})
    requires = frozenset({"kv_cache"})
    before = ("decoding",)
    config_field = "quantize_kv_cache"
    lossless = False

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        return decode_loop_support(model, ctx, "the INT8 KV cache")

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        layout = ctx.shared.get("kv_cache", KVCacheLayout())
        ctx.shared["kv_cache"] = dataclasses.replace(layout, int8=True)  # flux's decode loop and engine
        # the model's own forward (use_cache=True, and transformers' generate when it falls back): Int8Cache
        argument = cache_argument(model)
        ctx.patch.bind_method(model, "forward", int8_cache_forward(model.forward, argument))
        ctx.detail("forward_cache", "Int8Cache")
