"""The built-in plugins, registered through the same hook third-party packages use.

Registration order is the tie-break of the plan's ordering: weights first, then the modules that run them.
"""

from __future__ import annotations

from flux_infer.hookspecs import hookimpl
from flux_infer.plugins.adaptive_moe import AdaptiveMoEPlugin
from flux_infer.plugins.base import Plugin
from flux_infer.plugins.fast_generate import FastGeneratePlugin
from flux_infer.plugins.flash_attention import FlashAttentionPlugin
from flux_infer.plugins.fuse_projections import FuseProjectionsPlugin
from flux_infer.plugins.fused_kernels import FusedKernelsPlugin
from flux_infer.plugins.int4_fragments import Int4FragmentsPlugin
from flux_infer.plugins.kv_cache_int8 import KVCacheInt8Plugin
from flux_infer.plugins.paged_kv_cache import PagedKVCachePlugin
from flux_infer.plugins.quantization import QuantizationPlugin
from flux_infer.plugins.speculative_decoding import SpeculativeDecodingPlugin


@hookimpl
def flux_infer_register_plugins() -> list[Plugin]:
    return [
        QuantizationPlugin(),
        FlashAttentionPlugin(),
        FusedKernelsPlugin(),
        FuseProjectionsPlugin(),
        Int4FragmentsPlugin(),
        FastGeneratePlugin(),
        PagedKVCachePlugin(),
        KVCacheInt8Plugin(),
        SpeculativeDecodingPlugin(),
        AdaptiveMoEPlugin(),
    ]
