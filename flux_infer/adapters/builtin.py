"""The built-in adapters, registered through the same hook third-party packages use."""

from __future__ import annotations

from flux_infer.adapters.base import MLPStyle, ModelAdapter, NormStyle
from flux_infer.hookspecs import hookimpl

_GEMMA_SANDWICH = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")

BUILTIN_ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter("llama", ("llama",)),
    ModelAdapter("mistral", ("mistral",)),
    ModelAdapter("qwen2", ("qwen2", "qwen2_vl_text")),
    ModelAdapter("qwen3", ("qwen3",), qk_norms=("q_norm", "k_norm")),
    ModelAdapter("gemma", ("gemma",), norm_style=NormStyle.ONE_PLUS_WEIGHT),
    ModelAdapter("gemma2", ("gemma2",), norm_style=NormStyle.ONE_PLUS_WEIGHT, layer_norms=_GEMMA_SANDWICH),
    ModelAdapter("gemma3_text", ("gemma3_text",), norm_style=NormStyle.ONE_PLUS_WEIGHT,
                 layer_norms=_GEMMA_SANDWICH, qk_norms=("q_norm", "k_norm")),
    ModelAdapter("phi3", ("phi3",), mlp_style=MLPStyle.GATED_FUSED, attention_projections=("qkv_proj", "o_proj")),
    ModelAdapter("mixtral", ("mixtral",), mlp_style=MLPStyle.MOE),
    ModelAdapter("qwen2_moe", ("qwen2_moe",), mlp_style=MLPStyle.MOE, moe_shared_expert="shared_expert"),
    ModelAdapter("qwen3_moe", ("qwen3_moe",), mlp_style=MLPStyle.MOE, qk_norms=("q_norm", "k_norm")),
    ModelAdapter("olmoe", ("olmoe",), mlp_style=MLPStyle.MOE, qk_norms=("q_norm", "k_norm")),
    # Vision-language models: only the language model inside is optimized; its traits come from the text adapter.
    ModelAdapter("llava", ("llava",), language_model="model.language_model", text_config="text_config",
                 wraps_text_model=True),
    ModelAdapter("qwen2_vl", ("qwen2_vl",), language_model="model.language_model", text_config="text_config",
                 wraps_text_model=True),
)


@hookimpl
def flux_infer_register_adapters() -> tuple[ModelAdapter, ...]:
    return BUILTIN_ADAPTERS
