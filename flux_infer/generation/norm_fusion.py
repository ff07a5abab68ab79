"""Quantized decode steps without RMSNorm kernels: each norm between two INT4 layers is split between them.

A decoder layer runs ``norm -> q/k/v -> attention -> o_proj -> add + norm -> gate/up -> down -> add`` and the
next layer's norm. At decode batch sizes every one of those norms is a launch of its own on a tiny tensor (on an
H100 about 2 us of exposed time each, 64 per Llama-3-8B step). Here the layer before a norm (o_proj, down) adds
the residual, writes ``h * norm.weight`` and leaves the sums of squares of ``h`` per row, and the layer after it
(q/k/v, gate/up, the next layer's q/k/v, lm_head) applies the norm's scale ``rsqrt(mean(h^2) + eps)`` to its sums
(``QuantizedLinear.add_norm`` / ``norm_scaled``; kernels in ``csrc/quant_linear_norm.cu``). Only the first
layer's input norm still runs as a kernel. The scale moved behind a linear layer is the same function but not the
same rounding, so this is for quantized (lossy) models only; ``plan_norm_fusion`` says whether a model qualifies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from flux_infer.quantization.modules import QuantizedLinear

MAX_ROWS = 8  # tokens per step the fused path takes (the kernels' norm epilogues; more rows: the plain path,
# measured faster at 16: docs/benchmarks.md)
FRAGMENT_MAX_ROWS = 16  # the same when every layer around a norm is in the fragment layout (int4_fragments; its
# kernel's norm epilogues take 16 rows a launch: at 16 rows 6,049 against 5,878 tok/s with the norm kernels,
# Llama-3-8B shape on an H100, docs/benchmarks.md, seventeenth session)


@dataclasses.dataclass(frozen=True)
class NormFusedLayer:
    input_weight: torch.Tensor  # the input norm (q/k/v, found through the runner's LayerParts, take its scale)
    input_eps: float
    o_proj: QuantizedLinear
    post_weight: torch.Tensor  # the post-attention norm
    post_eps: float
    gate_up: QuantizedLinear | None  # a [gate; up] layer (act(gate) * up in its epilogue), or
    gate: QuantizedLinear | None  # separate gate and up layers
    up: QuantizedLinear | None
    down: QuantizedLinear
    activation: str


@dataclasses.dataclass(frozen=True)
class NormFusion:
    layers: tuple[NormFusedLayer, ...]  # (layer 0's input norm still runs as a kernel)
    final_weight: torch.Tensor
    final_eps: float
    lm_head: QuantizedLinear | None  # None: the last layer's down and the final norm run apart
    max_rows: int  # tokens per step the fused path takes (MAX_ROWS, or FRAGMENT_MAX_ROWS)

    def fits(self, hidden: torch.Tensor) -> bool:
        rows = hidden.numel() // hidden.shape[-1]
        return 0 < rows <= self.max_rows


def as_int4(module: Any) -> QuantizedLinear | None:
    """``module`` as a norm-fusable INT4 layer (a fused projection's quantized layer), else None."""
    module = getattr(module, "quantized", module)  # FusedProjection
    return module if isinstance(module, QuantizedLinear) and module.norm_fusable else None


def _weight_norm(norm: Any) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-style RMSNorm (``weight * norm(x)``), else None."""
    weight = getattr(norm, "weight", None)
    eps = next((v for a in ("eps", "variance_epsilon") if isinstance(v := getattr(norm, a, None), float)), None)
    if getattr(norm, "weight_offset", 0.0) != 0.0 or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return (weight, eps) if eps is not None else None


def plan_norm_fusion(layers: Sequence[Any], final_norm: torch.nn.Module, lm_head: torch.nn.Module,
                     weight_style: bool) -> NormFusion | None:
    """The fused step's layers if every norm between layers sits between INT4 layers that can take it, else None.
    ``layers``: the runner's ``LayerParts``; ``weight_style``: the adapter's norms are ``weight * norm(x)``."""
    if not weight_style or not layers:
        return None
    fused, around = [], []  # the layers and every INT4 layer around a norm
    for parts in layers:
        input_norm, post_norm = _weight_norm(parts.input_norm), _weight_norm(parts.post_attention_norm)
        qkv = (parts.fused_qkv,) if parts.fused_qkv is not None else parts.projections[:-1]
        qkv_layers = [as_int4(m) for m in qkv]
        o_proj = as_int4(parts.projections[-1])
        mlp = parts.mlp
        activation = getattr(mlp, "activation", None)
        if (input_norm is None or post_norm is None or None in qkv_layers or o_proj is None
                or not isinstance(activation, str) or not getattr(mlp, "gated_epilogue", False)):
            return None
        fused_gate_up = getattr(mlp, "flux_fused_gate_up", None)
        if fused_gate_up is not None and len(set(fused_gate_up.sizes)) == 1:
            gate_up, gate, up = as_int4(fused_gate_up), None, None
        elif getattr(mlp, "fused_gate_up", False):
            gate_up, gate, up = as_int4(getattr(mlp, "gate_up_proj", None)), None, None
        else:
            gate_up, gate, up = None, as_int4(getattr(mlp, "gate_proj", None)), as_int4(getattr(mlp, "up_proj", None))
        down = as_int4(getattr(mlp, "down_proj", None))
        if down is None or (gate_up is None and (gate is None or up is None)):
            return None
        around += [*qkv_layers, o_proj, *(m for m in (gate_up, gate, up) if m is not None), down]
        fused.append(NormFusedLayer(input_weight=input_norm[0], input_eps=input_norm[1], o_proj=o_proj,
                                    post_weight=post_norm[0], post_eps=post_norm[1], gate_up=gate_up, gate=gate,
                                    up=up, down=down, activation=activation))
    final = _weight_norm(final_norm)
    if final is None:
        return None
    head = as_int4(lm_head)
    on_fragments = all(m.fragments for m in (*around, head) if m is not None)
    return NormFusion(layers=tuple(fused), final_weight=final[0], final_eps=final[1], lm_head=head,
                      max_rows=FRAGMENT_MAX_ROWS if on_fragments else MAX_ROWS)
