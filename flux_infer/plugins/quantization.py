"""``quantization``: weight-only INT8 / INT4 (RTN or AWQ) for the decoder's linear layers."""

from __future__ import annotations

import torch

from flux_infer.plugins.base import PlanContext, Plugin, not_yet_available
from flux_infer.support import Support


class QuantizationPlugin(Plugin):
    name = "quantization"
    description = "weight-only INT8 (per channel) or INT4 (group-wise, RTN or AWQ) decoder linear layers"
    provides = frozenset({"weights:quantized"})
    config_field = "quantization"
    lossless = False

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        return not_yet_available(f"{ctx.config.quantization} weight quantization")
