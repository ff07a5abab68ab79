"""``int4_fragments`` (on by default with INT4 on CUDA): the INT4 decoder layers in the fragment layout of the
CUDA decode kernels.

``csrc/quant_frag.cu`` streams the fragment layout (``kernels/quant_frag.py``) at decode batch sizes faster than the
checkpoint layout's tensor-core kernel runs (H100, docs/benchmarks.md, sixteenth session: gate/up 26.1 vs 37.9 us at
16 rows, down 16.4 vs 20.6, lm_head 101.4 vs 141.8), and since the nineteenth session its kernel for 1-8 rows
(``csrc/quant_frag_rows.cuh``) does at one row too (H200: the gated, norm-scaled gate/up 20.1 against 26.6 us). Both
layouts at once would cost the memory INT4 saves, so the chosen layers switch for every batch size (``ROLES``): the
fused q/k/v and gate/up projections, o, down and a quantized lm_head. With every layer around a norm switched,
decode steps of up to 16 tokens run the norms inside those layers' kernels (``generation/norm_fusion.py``,
``FRAGMENT_MAX_ROWS``; the checkpoint layout's norm epilogues stop at 8). Llama-3-8B shape on an H200, same process
(nineteenth session): decode 564.0 / 1,743.2 / 3,302.9 / 6,371.0 tok/s at batch 1 / 4 / 8 / 16 against 464.8 /
1,678.6 / 3,338.5 / 5,108.0 without the plugin (bf16: 232.6 / 838.9 / 1,725.1 / 3,361.6), hence on by default
with INT4 quantization (a model loaded from an INT4 checkpoint gets it by name:
``InferenceConfig(plugins=["int4_fragments"])``); ``InferenceConfig(exclude=["int4_fragments"])`` keeps the
checkpoint layout. In place: codes, scales and
mins are reordered in their own storage (a fused projection's members are views of it and follow), the
``state_dict`` still gives the checkpoint layout, and ``revert`` reorders them back. CUDA only (the layout is for
those kernels), bf16, INT4 with group 128: elsewhere it is skipped as not applicable, with the reason in the
report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flux_infer.config import InferenceConfig, Quantization
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
    description = ("INT4 layers (q/k/v, o, gate/up, down, lm_head) in the fragment layout of the CUDA decode "
                   "kernels, norms inside them up to 16 rows (CUDA, INT4 group 128; exclude it to keep the "
                   "checkpoint layout)")
    provides = frozenset({"weights:int4_fragments"})
    config_field = "quantization"  # with its INT4 values (enabled)
    after = ("weights:quantized", "weights:fused_projections")
    before = ("decoding",)
    lossless = False  # the same weights, summed in another order: the kernel's results differ by roundings

    def enabled(self, config: InferenceConfig) -> bool:
        """With INT4 quantization (``quantization="int4"`` or ``"int4-awq"``, O3's preset); a model loaded from an
        INT4 checkpoint gets it by name (``plugins=["int4_fragments"]``)."""
        return config.quantization in (Quantization.INT4, Quantization.INT4_AWQ)

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
