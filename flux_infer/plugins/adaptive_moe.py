"""``adaptive_moe``: complexity-aware expert routing for mixture-of-experts models."""

from __future__ import annotations

import torch

from flux_infer.plugins.base import PlanContext, Plugin, not_yet_available
from flux_infer.support import Support


class AdaptiveMoEPlugin(Plugin):
    name = "adaptive_moe"
    description = "complexity-aware MoE routing: easy tokens use fewer experts"
    provides = frozenset({"moe_routing"})
    config_field = "adaptive_moe"
    lossless = False

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        if ctx.adapter is None or not ctx.adapter.is_moe():
            return Support.not_applicable("not a mixture-of-experts model")
        return not_yet_available("adaptive MoE routing")
