"""``int4_fragments`` (opt-in by name): the INT4 decoder layers in the fragment layout, for decode at batch sizes.

At decode batch sizes (about 8 rows and more) the checkpoint layout's tensor-core kernel runs the fused gate/up
layer at about half of the memory bandwidth; ``csrc/quant_frag.cu`` streams the fragment layout
(``kernels/quant_frag.py``) at about 80% (H100, docs/benchmarks.md, sixteenth session: gate/up 26.1 vs 37.9 us at 16
rows, down 16.4 vs 20.6, lm_head 101.4 vs 141.8). Both layouts at once would cost the memory INT4 saves, so the
chosen layers switch for every batch size (``ROLES``): the fused q/k/v and gate/up projections, o, down and a
quantized lm_head. With every layer around a norm switched, decode steps of up to 16 tokens run the norms inside
those layers' kernels (``generation/norm_fusion.py``, ``FRAGMENT_MAX_ROWS``; the checkpoint layout's norm epilogues
stop at 8). Llama-3-8B shape on an H100, same process (seventeenth session): batch-16 decode 6,049 tok/s with all
five roles against 5,878 with gate/up, down and lm_head only and 4,900 without the plugin (bf16: 2,481); batch 1
about 380 against 441 without it: a choice for serving batches, hence opt-in:
``InferenceConfig(plugins=["int4_fragments"])``. In place: codes, scales
and mins are reordered in their own storage (a fused projection's members are views of it and follow), the
``state_dict`` still gives the checkpoint layout, and ``revert`` reorders them back. CUDA only (the layout is for
that kernel), bf16, INT4 with group 128.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flux_infer.config import Quantization
from flux_infer.kernels import cuda, quant_frag
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.plugins.fuse_projections import GATE_UP, QKV
from flux_infer.quantization.modules import QuantizedLinear
from flux_infer.support import Support

ROLES = ("qkv", "o", "gate_up", "down", "lm_head")  # the layers that switch (an A/B knob of benchmarks/decode.py)


def _fused(parent: Any, attribute: str, names: tuple[str, ...], widths_fit: Callable[[tuple[int, ...]], bool]
           ) -> tuple[QuantizedLinear, list[QuantizedLinear]] | None:
    """A fused projection's INT4 layer and its members (views of its storage) when all of them are quantized and
    its widths fit the layout, else None."""
    fused = getattr(parent, attribute, None)
    members = [getattr(parent, n, None) for n in names]
    if (fused is None or not isinstance(fused.quantized, QuantizedLinear)
            or not all(isinstance(m, QuantizedLinear) for m in members) or not widths_fit(fused.sizes)):
        return None
    return fused.quantized, members


def _targets(model: torch.nn.Module, ctx: PlanContext) -> list[tuple[str, QuantizedLinear, list[QuantizedLinear]]]:
    """(role, layer to reorder, modules that share its storage) of every layer this plugin would switch."""
    adapter = ctx.adapter
    assert adapter is not None
    found: list[tuple[str, QuantizedLinear, list[QuantizedLinear]]] = []
    for _, _, _, mlp in adapter.dense_mlps(model):
        gate_up = _fused(mlp, "flux_fused_gate_up", GATE_UP, lambda sizes: len(set(sizes)) == 1 and sizes[0] % 64 == 0)
        if gate_up is not None:
            found.append(("gate_up", *gate_up))
        down = getattr(mlp, "down_proj", None)
        if isinstance(down, QuantizedLinear):
            found.append(("down", down, []))
    for layer in adapter.get_layers(model):
        attention = getattr(layer, adapter.attention, None)
        qkv = _fused(attention, "flux_fused_qkv", QKV, lambda sizes: all(s % 64 == 0 for s in sizes))
        if qkv is not None:
            found.append(("qkv", *qkv))
        o_proj = getattr(attention, adapter.attention_projections[-1], None)
        if isinstance(o_proj, QuantizedLinear):
            found.append(("o", o_proj, []))
    head = model.get_submodule(adapter.lm_head) if adapter.lm_head else None
    if isinstance(head, QuantizedLinear):
        found.append(("lm_head", head, []))
    return [t for t in found if t[0] in ROLES and t[1].fragments_fit and not t[1].fragments]


class Int4FragmentsPlugin(Plugin):
    name = "int4_fragments"
    description = ("opt-in by name: INT4 layers (q/k/v, o, gate/up, down, lm_head) in the fragment layout of their "
                   "CUDA batch kernel, norms inside them up to 16 rows (faster decode batches, slower single "
                   "sequences)")
    provides = frozenset({"weights:int4_fragments"})
    after = ("weights:quantized", "weights:fused_projections")
    before = ("decoding",)
    lossless = False  # the same weights, summed in another order: the kernel's results differ by roundings

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
