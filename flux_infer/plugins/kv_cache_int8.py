"""``kv_cache_int8``: INT8 keys and values with per-head scales, dequantized inside attention."""

from __future__ import annotations

import torch

from flux_infer.plugins.base import PlanContext, Plugin, not_yet_available
from flux_infer.support import Support


class KVCacheInt8Plugin(Plugin):
    name = "kv_cache_int8"
    description = "INT8 KV cache (half the KV memory), dequantized inside the attention kernel"
    provides = frozenset({"kv_cache:int8"})
    requires = frozenset({"kv_cache"})
    config_field = "quantize_kv_cache"
    lossless = False

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        return not_yet_available("the INT8 KV cache")
