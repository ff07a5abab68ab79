"""Custom ops (``torch.ops.flux.*``) with a pure-PyTorch reference beside each one.

Each op module defines the op with ``torch.library.custom_op``, its fake (meta) implementation for
``torch.compile``/CUDA graphs, and ``<op>_ref``: the reference with the same signature, which CPU runs use and
GPU tests compare against. Device kernels (``flux_infer/csrc``, Triton) register themselves on first use through
``kernels.registry``. This package never imports ``transformers``.
"""

from flux_infer.kernels.activation import ACTIVATIONS, act_mul, act_mul_ref
from flux_infer.kernels.attention import (
    cache_attention,
    cache_attention_mask,
    cache_attention_ref,
    masked_attention_ref,
    paged_attention,
    paged_attention_ref,
    paged_kv_write_,
    paged_kv_write_ref,
    quantize_kv_int8,
    rotary_attention_fits,
    rotary_cache_attention,
    rotary_cache_attention_ref,
)
from flux_infer.kernels.matmul import linear, linear_ref
from flux_infer.kernels.quant import (
    int4_gated_linear_norm_scaled,
    int4_gated_linear_norm_scaled_ref,
    int4_linear,
    int4_linear_add_norm,
    int4_linear_add_norm_ref,
    int4_linear_norm_scaled,
    int4_linear_norm_scaled_ref,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
    quantized_gated_linear,
    quantized_gated_linear_ref,
)
from flux_infer.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from flux_infer.kernels.quant_frag import (
    int4f_linear,
    int4f_linear_add_norm,
    int4f_linear_add_norm_ref,
    int4f_linear_ref,
)
from flux_infer.kernels.registry import implementation
from flux_infer.kernels.rotary import (
    rotary_cache_write_,
    rotary_cache_write_ref,
    rotary_embedding_,
    rotary_embedding_ref,
)

__all__ = [
    "ACTIVATIONS",
    "act_mul",
    "act_mul_ref",
    "add_rms_norm",
    "add_rms_norm_ref",
    "cache_attention",
    "cache_attention_mask",
    "cache_attention_ref",
    "implementation",
    "int4_gated_linear_norm_scaled",
    "int4_gated_linear_norm_scaled_ref",
    "int4_linear",
    "int4f_linear",
    "int4f_linear_add_norm",
    "int4f_linear_add_norm_ref",
    "int4f_linear_ref",
    "int4_linear_add_norm",
    "int4_linear_add_norm_ref",
    "int4_linear_norm_scaled",
    "int4_linear_norm_scaled_ref",
    "int4_linear_ref",
    "int8_linear",
    "int8_linear_ref",
    "linear",
    "linear_ref",
    "masked_attention_ref",
    "paged_attention",
    "paged_attention_ref",
    "paged_kv_write_",
    "paged_kv_write_ref",
    "quantize_kv_int8",
    "quantized_gated_linear",
    "quantized_gated_linear_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_attention_fits",
    "rotary_cache_attention",
    "rotary_cache_attention_ref",
    "rotary_cache_write_",
    "rotary_cache_write_ref",
    "rotary_embedding_",
    "rotary_embedding_ref",
]
