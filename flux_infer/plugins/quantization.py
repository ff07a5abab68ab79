"""``quantization``: weight-only INT8 (per channel), INT4 (group-wise, round-to-nearest) or INT4 with AWQ scales.

Which layers: every linear layer of the decoder (attention and MLP projections, MoE experts); embeddings and
lm_head stay in full precision unless ``InferenceConfig(quantize_lm_head=True)``. A layer whose input size no
supported group size divides keeps its weights, and the report counts it.

The original weights are kept so that ``revert`` restores them exactly; on a GPU they are moved to host memory
while the model is quantized, so the GPU holds only the quantized weights.
"""

from __future__ import annotations

from typing import Any

import torch

from flux_infer.adapters.base import MLPStyle, ModelAdapter, NormStyle
from flux_infer.config import Quantization
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.quantization import awq
from flux_infer.quantization.checkpoints import save_quantized
from flux_infer.quantization.modules import QuantizedExperts, QuantizedLinear
from flux_infer.quantization.rtn import choose_group_size
from flux_infer.support import Support

CALIBRATION_SAMPLES = 16
CALIBRATION_LENGTH = 256


def is_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedExperts)) for m in model.modules())


class QuantizationPlugin(Plugin):
    name = "quantization"
    description = "weight-only INT8 (per channel) or INT4 (group-wise, RTN or AWQ) decoder linear layers"
    provides = frozenset({"weights:quantized"})
    config_field = "quantization"
    lossless = False

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        if is_quantized(model):
            return Support.not_applicable("the weights are already quantized (a quantized checkpoint)")
        assert ctx.adapter is not None
        linears = [m for *_, m in ctx.adapter.linears(model)]
        if not linears:
            return Support.no("no linear layers found in the decoder")
        if not all(isinstance(m, torch.nn.Linear) for m in linears):
            kinds = sorted({type(m).__name__ for m in linears if not isinstance(m, torch.nn.Linear)})
            return Support.no(f"decoder projections are not torch.nn.Linear ({', '.join(kinds)})")
        if ctx.config.quantization is not Quantization.INT8:
            if all(choose_group_size(m.in_features, ctx.config.quantization_group_size) is None for m in linears):
                return Support.no("no layer's input size is a multiple of a supported INT4 group size (32, 64, 128)")
        return Support.yes()

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        adapter = ctx.adapter
        assert adapter is not None
        method = ctx.config.quantization
        bits = 8 if method is Quantization.INT8 else 4
        requested = ctx.config.quantization_group_size
        prepared: dict[torch.nn.Module, torch.Tensor] = {}  # weights after AWQ scaling and clipping
        if method is Quantization.INT4_AWQ:
            prepared = _awq(model, adapter, ctx, requested)

        targets = [(name, parent, attr, module) for name, parent, attr, module in adapter.linears(model)]
        if ctx.config.quantize_lm_head:
            parent_path, _, attr = adapter.lm_head.rpartition(".")
            parent = model.get_submodule(parent_path)
            targets.append((adapter.lm_head, parent, attr, getattr(parent, attr)))
        quantized, kept, groups = 0, [], set()
        for name, parent, attr, module in targets:
            group = None if bits == 8 else choose_group_size(module.in_features, requested)
            if bits == 4 and group is None:
                kept.append(name)
                continue
            weight = prepared.get(module, module.weight)
            replacement = QuantizedLinear.from_weight(weight, module.bias, bits=bits, group_size=group)
            _swap(ctx, model, parent, attr, module, replacement)
            quantized += 1
            groups.add(group)
        experts = 0
        for name, parent, attr, module in list(adapter.experts(model)):
            hidden, inner = module.gate_up_proj.shape[-1], module.down_proj.shape[-1]
            group = None if bits == 8 else choose_group_size(min(hidden, inner), requested)
            if bits == 4 and (group is None or hidden % group or inner % group):
                kept.append(name)
                continue
            _swap(ctx, model, parent, attr, module, QuantizedExperts(module, bits=bits, group_size=group))
            experts += 1
        ctx.detail("method", str(method))
        ctx.detail("layers", quantized)
        if experts:
            ctx.detail("expert_blocks", experts)
        if bits == 4:
            ctx.detail("group_size", ",".join(str(g) for g in sorted(groups)) or "-")
        if kept:
            ctx.detail("kept_full_precision", len(kept))
        from flux_infer import kernels

        ctx.use_kernel(f"int{bits}_linear", kernels.implementation(f"int{bits}_linear", ctx.device))
        # model.save_pretrained writes a flux checkpoint, which flux_infer.load reads back
        ctx.patch.bind_method(model, "save_pretrained", save_quantized)


def _swap(ctx: ApplyContext, model: torch.nn.Module, parent: torch.nn.Module, attr: str, original: torch.nn.Module,
          replacement: torch.nn.Module) -> None:
    """Replace ``original`` by ``replacement``; on a GPU the original's tensors wait in host memory for revert,
    unless the model still uses them (a quantized lm_head tied to the input embeddings keeps them there)."""
    device = next(original.parameters()).device
    ctx.patch.replace_module(parent, attr, replacement)
    if device.type == "cpu":
        return
    still_used = {id(p) for p in model.parameters()}
    if not any(id(p) in still_used for p in original.parameters()):
        original.to("cpu")
        ctx.patch.on_rollback(f"move the original {attr} back to {device}", lambda: original.to(device))


def _calibration_ids(model: torch.nn.Module, ctx: ApplyContext) -> torch.Tensor:
    """``[samples, length]`` token ids: the user's (``InferenceConfig.calibration_data``) or the built-in text."""
    data: Any = ctx.config.calibration_data
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int32, torch.int64):
            raise ValueError("calibration_data as a tensor must be token ids of shape [samples, length]")
        return data.long()
    from transformers import AutoTokenizer

    from flux_infer.evaluation import calibration_text

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ValueError(
            f"AWQ calibration needs token ids: no tokenizer could be loaded from {source!r} ({exc}); pass "
            "InferenceConfig(calibration_data=<LongTensor [samples, length]>)"
        ) from exc
    texts = list(data) if data else [calibration_text()]
    ids = torch.cat([tokenizer(t, return_tensors="pt")["input_ids"][0] for t in texts])
    length = CALIBRATION_LENGTH
    samples = min(CALIBRATION_SAMPLES, ids.numel() // length)
    if samples == 0:
        raise ValueError(f"calibration_data has {ids.numel()} tokens; AWQ needs at least {length}")
    return ids[: samples * length].view(samples, length)


def _norm_divider(ctx: ApplyContext, norm: torch.nn.Module, style: NormStyle):
    """Divide a norm's output by ``s`` by rewriting its weight (through the recorder)."""
    def fold(s: torch.Tensor) -> None:
        w = norm.weight.detach().float()
        new = w / s if style is NormStyle.WEIGHT else (1.0 + w) / s - 1.0
        ctx.patch.setattr(norm, "weight", torch.nn.Parameter(new.to(norm.weight.dtype), requires_grad=False))
    return fold


def _awq(model: torch.nn.Module, adapter: ModelAdapter, ctx: ApplyContext, requested: int
         ) -> dict[torch.nn.Module, torch.Tensor]:
    """Search AWQ scales and clipping on calibration data; returns the weights to quantize per linear module."""
    prepared: dict[torch.nn.Module, torch.Tensor] = {}

    def weight_of(linear: torch.nn.Linear) -> torch.Tensor:
        return prepared.setdefault(linear, linear.weight.detach().clone())

    groups: list[awq.ScaleGroup] = []
    for layer in adapter.get_layers(model):
        attention = getattr(layer, adapter.attention)
        qkv = [getattr(attention, n) for n in adapter.attention_projections[:-1]]
        norm_in = getattr(layer, adapter.layer_norms[0])
        groups.append(awq.ScaleGroup("qkv", qkv, _norm_divider(ctx, norm_in, adapter.norm_style)))
        if adapter.mlp_style is MLPStyle.MOE:
            continue
        mlp = getattr(layer, adapter.mlp)
        norm_mlp = getattr(layer, adapter.mlp_input_norm)
        if adapter.mlp_style is MLPStyle.GATED:
            up, down = mlp.up_proj, mlp.down_proj
            groups.append(awq.ScaleGroup("gate_up", [mlp.gate_proj, up],
                                         _norm_divider(ctx, norm_mlp, adapter.norm_style)))

            def fold_up(s: torch.Tensor, up: torch.nn.Linear = up) -> None:
                weight_of(up).div_(s.to(up.weight.dtype)[:, None])
        else:  # GATED_FUSED: the up half of gate_up_proj produces the down projection's input
            up, down = mlp.gate_up_proj, mlp.down_proj
            groups.append(awq.ScaleGroup("gate_up", [up], _norm_divider(ctx, norm_mlp, adapter.norm_style)))

            def fold_up(s: torch.Tensor, up: torch.nn.Linear = up) -> None:
                half = weight_of(up).shape[0] // 2
                weight_of(up)[half:].div_(s.to(up.weight.dtype)[:, None])
        groups.append(awq.ScaleGroup("down", [down], fold_up))

    handles = awq.collect(groups)
    try:
        ids = _calibration_ids(model, ctx).to(ctx.device)
        with torch.no_grad():
            for row in ids:
                model(input_ids=row[None])
    finally:
        for handle in handles:
            handle.remove()

    searched = 0
    # down first: its scales divide up_proj's rows, which the gate/up search must then see
    for group in sorted(groups, key=lambda g: g.name != "down"):
        sizes = {choose_group_size(lin.in_features, requested) for lin in group.linears}
        if None in sizes or group.inputs is None:
            continue
        (size,) = sizes
        s = awq.search_scales(group, [weight_of(lin) for lin in group.linears], size).to(ctx.device)
        group.fold(s)
        x = group.inputs[-awq.EVAL_TOKENS:].to(ctx.device) / s
        for linear in group.linears:
            scaled = (weight_of(linear).float() * s).to(linear.weight.dtype)
            prepared[linear] = awq.clip_weight(scaled, size, awq.search_clip(scaled, x, size))
        searched += 1
    ctx.detail("awq_groups", searched)
    return prepared
