"""``ModelAdapter``: where the parts of one decoder architecture live. The only code that knows an architecture.

An adapter is data (attribute paths and a few traits), not code per model: transformers' decoder families share
one shape (``<lm>.layers[i].self_attn / .mlp / .input_layernorm ...``) and differ in a handful of traits
(norm style, fused projections, MoE blocks, where the language model sits inside a VLM).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from typing import Any

import torch

from flux_infer.support import Support


class NormStyle(str, enum.Enum):
    """How an RMSNorm applies its weight."""

    WEIGHT = "weight"  # y = weight * norm(x)            (Llama, Mistral, Qwen, Phi-3, OLMoE)
    ONE_PLUS_WEIGHT = "one_plus_weight"  # y = (1 + weight) * norm(x)  (Gemma family), computed in fp32


class MLPStyle(str, enum.Enum):
    GATED = "gated"  # gate_proj, up_proj, down_proj
    GATED_FUSED = "gated_fused"  # gate_up_proj (gate first, then up), down_proj      (Phi-3)
    MOE = "moe"  # router + stacked experts (+ optional shared expert)


# the projections of each dense MLP layout, in call order
MLP_PROJECTIONS = {
    MLPStyle.GATED: ("gate_proj", "up_proj", "down_proj"),
    MLPStyle.GATED_FUSED: ("gate_up_proj", "down_proj"),
}

# hidden_act values of transformers' ACT2FN that our fused gated-activation kernels implement
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """Locates the parts of a decoder-only language model (or the language model inside a VLM)."""

    name: str
    model_types: tuple[str, ...]
    language_model: str = "model"  # dotted path from the top-level model to the decoder stack
    text_config: str | None = None  # attribute of the top-level config holding the text config (VLMs)
    layers: str = "layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    qk_norms: tuple[str, ...] = ()
    final_norm: str = "norm"
    embed_tokens: str = "embed_tokens"
    lm_head: str = "lm_head"
    norm_style: NormStyle = NormStyle.WEIGHT
    mlp_style: MLPStyle = MLPStyle.GATED
    attention_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    moe_shared_expert: str | None = None  # dense MLP that every token also goes through (Qwen2-MoE)
    moe_router: str = "gate"
    moe_experts: str = "experts"
    wraps_text_model: bool = False  # a VLM: the text traits come from the adapter of text_config.model_type

    # ---- composition --------------------------------------------------------------------------------------
    def around(self, text_adapter: ModelAdapter) -> ModelAdapter:
        """For a VLM adapter: the text adapter's traits, located inside this VLM."""
        return dataclasses.replace(
            text_adapter,
            name=f"{self.name}({text_adapter.name})",
            model_types=self.model_types,
            language_model=self.language_model,
            text_config=self.text_config,
            lm_head=self.lm_head,
            wraps_text_model=False,
        )

    # ---- locating parts -----------------------------------------------------------------------------------
    def get_text_config(self, model: torch.nn.Module) -> Any:
        config = model.config
        return getattr(config, self.text_config) if self.text_config else config

    def get_language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.get_submodule(self.language_model)

    def get_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return self.get_language_model(model).get_submodule(self.layers)

    def get_lm_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.get_submodule(self.lm_head)

    def activation(self, model: torch.nn.Module) -> str | None:
        """The gated-MLP activation as a kernel name ("silu", "gelu_tanh"), or None if we have no kernel for it."""
        config = self.get_text_config(model)
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        return ACTIVATIONS.get(act)

    def norms(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
        """Every RMSNorm of the language model: (qualified name, parent module, attribute, norm module)."""
        lm = self.get_language_model(model)
        for i, layer in enumerate(self.get_layers(model)):
            for attr in self.layer_norms:
                if hasattr(layer, attr):
                    yield f"{self.layers}.{i}.{attr}", layer, attr, getattr(layer, attr)
            attention = getattr(layer, self.attention)
            for attr in self.qk_norms:
                yield f"{self.layers}.{i}.{self.attention}.{attr}", attention, attr, getattr(attention, attr)
        yield self.final_norm, lm, self.final_norm, lm.get_submodule(self.final_norm)

    def dense_mlps(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
        """Every dense gated MLP (per layer, or the shared expert of an MoE block)."""
        for i, layer in enumerate(self.get_layers(model)):
            mlp = getattr(layer, self.mlp)
            if self.mlp_style is MLPStyle.MOE:
                if self.moe_shared_expert and hasattr(mlp, self.moe_shared_expert):
                    name = f"{self.layers}.{i}.{self.mlp}.{self.moe_shared_expert}"
                    yield name, mlp, self.moe_shared_expert, getattr(mlp, self.moe_shared_expert)
            else:
                yield f"{self.layers}.{i}.{self.mlp}", layer, self.mlp, mlp

    def linears(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
        """Every linear layer of the decoder outside the MoE experts: attention projections and dense MLPs."""
        for i, layer in enumerate(self.get_layers(model)):
            attention = getattr(layer, self.attention)
            for attr in self.attention_projections:
                yield f"{self.layers}.{i}.{self.attention}.{attr}", attention, attr, getattr(attention, attr)
        for name, _, _, mlp in self.dense_mlps(model):
            for attr in MLP_PROJECTIONS[self.dense_mlp_style()]:
                if isinstance(getattr(mlp, attr, None), torch.nn.Linear):
                    yield f"{name}.{attr}", mlp, attr, getattr(mlp, attr)

    @property
    def mlp_input_norm(self) -> str:
        """The norm whose output the MLP reads (Gemma 2/3 put a separate pre-feed-forward norm there)."""
        return "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in self.layer_norms else self.layer_norms[1]

    def experts(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
        """Every MoE block's stacked experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])."""
        if self.mlp_style is not MLPStyle.MOE:
            return
        for i, layer in enumerate(self.get_layers(model)):
            mlp = getattr(layer, self.mlp)
            experts = getattr(mlp, self.moe_experts, None)
            if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
                yield f"{self.layers}.{i}.{self.mlp}.{self.moe_experts}", mlp, self.moe_experts, experts

    def dense_mlp_style(self) -> MLPStyle:
        """The layout of the modules ``dense_mlps`` yields (shared experts are plain gated MLPs)."""
        return MLPStyle.GATED if self.mlp_style is MLPStyle.MOE else self.mlp_style

    def is_moe(self) -> bool:
        return self.mlp_style is MLPStyle.MOE

    # ---- validation ---------------------------------------------------------------------------------------
    def check(self, model: torch.nn.Module) -> Support:
        """Whether this model has the structure this adapter describes; the reason names what is missing."""
        try:
            lm = self.get_language_model(model)
            layers = self.get_layers(model)
        except AttributeError as exc:
            return Support.no(f"adapter {self.name!r} expected a decoder at `{self.language_model}.{self.layers}`: {exc}")
        if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
            return Support.no(f"adapter {self.name!r}: `{self.layers}` is not a non-empty ModuleList")
        missing = [a for a in (self.attention, self.mlp, *self.layer_norms[:2]) if not hasattr(layers[0], a)]
        if not hasattr(lm, self.final_norm):
            missing.append(self.final_norm)
        if missing:
            return Support.no(f"adapter {self.name!r}: decoder layers lack {', '.join(missing)}")
        return Support.yes()
