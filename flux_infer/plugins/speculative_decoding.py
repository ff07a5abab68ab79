"""``speculative_decoding``: draft-then-verify decoding (draft model, prompt lookup or self-speculation)."""

from __future__ import annotations

import torch

from flux_infer.plugins.base import PlanContext, Plugin, not_yet_available
from flux_infer.support import Support


class SpeculativeDecodingPlugin(Plugin):
    name = "speculative_decoding"
    description = "speculative decoding: gamma draft tokens verified in one forward (greedy output unchanged)"
    provides = frozenset({"decoding:speculative"})
    after = ("attention", "kv_cache")
    config_field = "speculative"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        return not_yet_available(f"speculative decoding ({ctx.config.speculative})")
