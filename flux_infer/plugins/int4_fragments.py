"""``int4_fragments``: the wide INT4 layers of a decode step in the fragment layout, for their batch kernel.

At decode batch sizes (16 rows and so on) the checkpoint layout's tensor-core kernel runs the fused gate/up layer
at about half of the memory bandwidth; ``csrc/quant_frag.cu`` streams the fragment layout
(``kernels/quant_frag.py``) at 80% and more (H100, docs/benchmarks.md, thirteenth session: gate/up 25.2 vs 37.2
us at 16 rows, lm_head 98.8 vs 138.7) and matches or beats the checkpoint layout's kernels at one row on these
layers. Both layouts at once would cost the memory INT4 saves, so the chosen layers switch for good: the fused
gate/up projection, down and a quantized lm_head (``ROLES``); q/k/v and o keep the checkpoint layout, whose
kernels are faster for them at one row. In place: codes, scales and mins are reordered in their own storage (a
fused projection's members are views of it and follow), the ``state_dict`` still gives the checkpoint layout,
and ``revert`` reorders them back. CUDA only (the layout is for that kernel), bf16, INT4 with group 128.
"""

from __future__ import annotations

from typing import Any

import torch

from flux_infer.config import Quantization
from flux_infer.kernels import cuda, quant_frag
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.quantization.modules import QuantizedLinear
from flux_infer.support import Support

GATE_UP = ("gate_proj", "up_proj")
ROLES = ("gate_up", "down", "lm_head")  # the layers that switch (the A/B knob of benchmarks/decode.py)


def _targets(model: torch.nn.Module, ctx: PlanContext) -> list[tuple[str, QuantizedLinear, list[QuantizedLinear]]]:
    """(role, layer to reorder, modules that share its storage) of every layer this plugin would switch."""
    adapter = ctx.adapter
    assert adapter is not None
    found: list[tuple[str, QuantizedLinear, list[QuantizedLinear]]] = []
    for _, _, _, mlp in adapter.dense_mlps(model):
        fused = getattr(mlp, "flux_fused_gate_up", None)
        members = [getattr(mlp, n, None) for n in GATE_UP]
        if (fused is not None and isinstance(fused.quantized, QuantizedLinear)
                and all(isinstance(m, QuantizedLinear) for m in members) and len(set(fused.sizes)) == 1
                and fused.sizes[0] % 64 == 0):
            found.append(("gate_up", fused.quantized, members))
        down = getattr(mlp, "down_proj", None)
        if isinstance(down, QuantizedLinear):
            found.append(("down", down, []))
    head = model.get_submodule(adapter.lm_head) if adapter.lm_head else None
    if isinstance(head, QuantizedLinear):
        found.append(("lm_head", head, []))
    return [t for t in found if t[0] in ROLES and t[1].fragments_fit and not t[1].fragments]


class Int4FragmentsPlugin(Plugin):
    name = "int4_fragments"
    description = "wide INT4 layers (gate/up, down, lm_head) in the fragment layout of their decode-batch CUDA kernel"
    provides = frozenset({"weights:int4_fragments"})
    after = ("weights:quantized", "weights:fused_projections")
    before = ("decoding",)
    config_field = "fused_kernels"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        if ctx.device.type != "cuda":
            return Support.not_applicable("the fragment layout is for the CUDA batch kernel")
        planned = ctx.config.quantization in (Quantization.INT4, Quantization.INT4_AWQ)
        if not planned and not any(isinstance(m, QuantizedLinear) and m.bits == 4 for m in model.modules()):
            return Support.not_applicable("no INT4 layers")
        if not cuda.load():
            return Support.not_applicable(f"the CUDA kernels are not available ({cuda.status()})")
        return Support.yes()

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        switched: dict[str, int] = {}
        for role, layer, members in _targets(model, ctx):
            quant_frag.counters(layer.qweight.device)  # made now, outside any CUDA-graph capture
            layer.set_fragments(True)
            for member in members:
                member.set_fragments(True, storage_only=True)
            ctx.patch.on_rollback(f"give the {role} layer its checkpoint layout back",
                                  _restore(layer, members))
            switched[role] = switched.get(role, 0) + 1
        for role in ROLES:
            ctx.detail(role, switched.get(role, 0))


def _restore(layer: QuantizedLinear, members: list[QuantizedLinear]) -> Any:
    def restore() -> None:
        layer.set_fragments(False)
        for member in members:
            member.set_fragments(False, storage_only=True)
    return restore
