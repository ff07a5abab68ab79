"""``paged_kv_cache``: flux's decode loop keeps its KV cache in fixed-size blocks of one pool.

It configures the layout (``ctx.shared["kv_cache"]``) that ``fast_generate`` builds its decoder on; the
continuous-batching engine always uses this layout.
"""

from __future__ import annotations

import dataclasses

import torch

from flux_infer.generation.runner import runner_support
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.support import Support

BLOCK_SIZE = 16


@dataclasses.dataclass(frozen=True)
class KVCacheLayout:
    """``ctx.shared["kv_cache"]``: the layout fast_generate's decoder uses."""

    kind: str = "paged"
    block_size: int = BLOCK_SIZE
    int8: bool = False


def decode_loop_support(model: torch.nn.Module, ctx: PlanContext, what: str) -> Support:
    """A KV cache layout serves flux's decode loop: it needs that loop to be on and able to run the model."""
    if not ctx.config.fast_generate:
        return Support.not_applicable(f"{what} serves flux's decode loop (fast_generate), which this config turns off")
    assert ctx.adapter is not None
    answer = runner_support(model, ctx.adapter)
    return answer if not answer else Support.yes()


class PagedKVCachePlugin(Plugin):
    name = "paged_kv_cache"
    description = "KV cache in 16-token blocks from one pool, with block tables per sequence"
    provides = frozenset({"kv_cache"})
    after = ("attention",)
    before = ("decoding",)
    config_field = "paged_kv_cache"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        return decode_loop_support(model, ctx, "the paged KV cache")

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        ctx.shared["kv_cache"] = KVCacheLayout()
        ctx.detail("block_size", BLOCK_SIZE)
