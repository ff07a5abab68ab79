"""``fuse_projections``: q/k/v and gate/up weights in one buffer each, so decode runs one GEMM instead of 3 and 2.

Each layer's q/k/v (gate/up) weights are copied into one contiguous tensor and the existing ``Parameter`` objects
are re-pointed (``param.data``) at views of it, so the ``state_dict`` keeps its names, values and parameter
objects, every code path (transformers' own forward included) still works, and the old storage is freed. The fused tensor hangs off the attention (MLP) module as a
plain attribute (``flux_fused_qkv`` / ``flux_fused_gate_up``), which flux's decode loop and fused MLP use.

Measured on an H200 (benchmarks/gemv.py, batch 1): q+k+v 24.5 us -> 14.8 us fused; gate+up 62.6 us -> 57.7 us.
Quantized projections (same bits, group size and dtype) fuse the same way: codes, scales and mins concatenated
along the output rows into one ``QuantizedLinear``, each module's buffers re-pointed at views of them.
On the CPU there is nothing to gain and it is skipped. ``revert`` gives each layer its own weights back: equal
values in fresh storage (memory never holds both layouts, beyond one layer while fusing).
"""

from __future__ import annotations

import dataclasses

import torch

from flux_infer import kernels
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.quantization.modules import QuantizedLinear
from flux_infer.support import Support

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclasses.dataclass(frozen=True)
class FusedProjection:
    """One weight (and bias) for several projections; ``sizes`` are their output widths, in order. Quantized
    projections fuse into one ``QuantizedLinear`` (``quantized``) over concatenated codes and scales."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    quantized: QuantizedLinear | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x)
        return kernels.linear(x, self.weight, self.bias)


def _fusable(modules: list[torch.nn.Module]) -> bool:
    first = modules[0]
    if all(isinstance(m, QuantizedLinear) for m in modules):
        return all(m.bits == first.bits and m.group_size == first.group_size and m.weight_dtype == first.weight_dtype
                   and m.in_features == first.in_features and (m.bias is None) == (first.bias is None)
                   and m.input_perm is None for m in modules)
    return all(isinstance(m, torch.nn.Linear) for m in modules) and all(  # FluxLinear included
        m.weight.dtype == first.weight.dtype and m.weight.shape[1] == first.weight.shape[1]
        and (m.bias is None) == (first.bias is None) for m in modules
    )


def _fuse(ctx: ApplyContext, owner: torch.nn.Module, names: tuple[str, ...], attribute: str) -> bool:
    modules = [getattr(owner, n) for n in names]
    if not _fusable(modules):
        return False
    if isinstance(modules[0], QuantizedLinear):
        return _fuse_quantized(ctx, owner, modules, names, attribute)
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
    sizes = tuple(m.weight.shape[0] for m in modules)
    params = [p for m in modules for p in (m.weight, m.bias) if p is not None]
    offset = 0
    for module, size in zip(modules, sizes, strict=True):
        module.weight.data = weight[offset:offset + size]
        if bias is not None:
            module.bias.data = bias[offset:offset + size]
        offset += size

    def split_again() -> None:  # separate storage again; the fused buffer goes with the last view
        for param in params:
            param.data = param.data.clone()

    ctx.patch.on_rollback(f"give {', '.join(names)} separate weights again", split_again)
    ctx.patch.setattr(owner, attribute, FusedProjection(weight, bias, sizes))
    return True


def _fuse_quantized(ctx: ApplyContext, owner: torch.nn.Module, modules: list[QuantizedLinear],
                    names: tuple[str, ...], attribute: str) -> bool:
    """Codes, scales (mins) and biases concatenated along the output rows; each module's buffers become views."""
    first = modules[0]
    sizes = tuple(m.out_features for m in modules)
    fused = QuantizedLinear(first.in_features, sum(sizes), bits=first.bits, group_size=first.group_size,
                            bias=first.bias is not None, dtype=first.weight_dtype, device="meta")
    buffers = [name for name, value in first.named_buffers(recurse=False) if value is not None]
    for name in buffers:
        setattr(fused, name, torch.cat([getattr(m, name) for m in modules]))
    offset = 0
    for module, size in zip(modules, sizes, strict=True):
        for name in buffers:
            setattr(module, name, getattr(fused, name)[offset:offset + size])
        offset += size

    def split_again() -> None:
        for module in modules:
            for name in buffers:
                setattr(module, name, getattr(module, name).clone())

    ctx.patch.on_rollback(f"give {', '.join(names)} separate quantized weights again", split_again)
    ctx.patch.setattr(owner, attribute, FusedProjection(None, None, sizes, quantized=fused))
    return True


class FuseProjectionsPlugin(Plugin):
    name = "fuse_projections"
    description = "q/k/v and gate/up weights fused into one GEMM each (CUDA; views keep the state_dict unchanged)"
    provides = frozenset({"weights:fused_projections"})
    after = ("weights:quantized", "kernels:gated_activation")  # fused onto the final (flux) MLP modules
    before = ("decoding",)
    config_field = "fused_kernels"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        if ctx.device.type != "cuda":
            return Support.not_applicable("fusing projections speeds up GPU GEMVs; on the CPU there is nothing to gain")
        assert ctx.adapter is not None
        if ctx.adapter.attention_projections[:3] != QKV and ctx.adapter.dense_mlp_style().value != "gated":
            return Support.not_applicable("the model already has fused projections")
        return Support.yes()

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        adapter = ctx.adapter
        assert adapter is not None
        attention_fused = mlp_fused = 0
        with torch.no_grad():
            if adapter.attention_projections[:3] == QKV:
                for layer in adapter.get_layers(model):
                    attention_fused += _fuse(ctx, getattr(layer, adapter.attention), QKV, "flux_fused_qkv")
            if adapter.dense_mlp_style().value == "gated":
                for _, _, _, mlp in list(adapter.dense_mlps(model)):
                    if all(hasattr(mlp, n) for n in GATE_UP):
                        mlp_fused += _fuse(ctx, mlp, GATE_UP, "flux_fused_gate_up")
        ctx.detail("qkv", attention_fused)
        ctx.detail("gate_up", mlp_fused)
