"""``paged_kv_cache``: the KV cache in fixed-size blocks of one preallocated pool."""

from __future__ import annotations

import torch

from flux_infer.plugins.base import PlanContext, Plugin, not_yet_available
from flux_infer.support import Support


class PagedKVCachePlugin(Plugin):
    name = "paged_kv_cache"
    description = "KV cache in 16-token blocks from one preallocated pool, with block tables per sequence"
    provides = frozenset({"kv_cache"})
    after = ("attention",)
    config_field = "paged_kv_cache"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        return not_yet_available("the paged KV cache")
