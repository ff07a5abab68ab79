"""``DecoderRunner``: one forward over a batch of sequences, on the model's own modules, with a flux KV cache.

The runner composes the model's submodules (embedding, the linear projections, norms, MLPs, lm_head: whatever
modules are installed, so quantized or fused replacements are used automatically) and owns only the glue: the
residual stream, rotary embedding, and attention through the cache layout. It reads the architecture through
the adapter and never calls transformers' decoder-layer or attention forwards, so its shapes stay fixed and a
decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from flux_infer import kernels
from flux_infer.adapters.base import ModelAdapter
from flux_infer.generation.cache import KVCache, StaticKVCache
from flux_infer.support import Support

# rope types whose cos/sin depend only on the position (a table computed once is exact)
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


@dataclasses.dataclass(frozen=True)
class LayerParts:
    input_norm: torch.nn.Module
    post_attention_norm: torch.nn.Module
    projections: tuple[torch.nn.Module, ...]  # (q, k, v, o) or (qkv, o)
    fused_qkv: Any  # FusedProjection from the fuse_projections plugin, or None
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None
    mlp: torch.nn.Module
    scale: float
    window: int  # 0 = full attention


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return "per-layer-type"  # e.g. Gemma 3's separate local/global rope
    return (params.get("rope_type") or params.get("type") or "default") if isinstance(params, dict) else "default"


def runner_support(model: torch.nn.Module, adapter: ModelAdapter) -> Support:
    """Whether ``DecoderRunner`` implements this model exactly; otherwise a reason to keep transformers' path."""
    config = adapter.get_text_config(model)
    if adapter.text_config is not None:
        return Support.no("vision-language models keep transformers' generate (images enter through it)")
    if adapter.is_moe():
        return Support.no("mixture-of-experts decode is not in flux's decode loop yet")
    if len(adapter.layer_norms) != 2:
        return Support.no("sandwich norms (Gemma 2/3) are not in flux's decode loop yet")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return Support.no("attention logit soft-capping is not in flux's decode loop yet")
    rope = _rope_type(config)
    if rope not in STATIC_ROPE_TYPES:
        return Support.no(f"rope type {rope!r} depends on the sequence length; flux's decode loop precomputes "
                          f"rotary tables for {sorted(STATIC_ROPE_TYPES)}")
    lm = adapter.get_language_model(model)
    if not hasattr(lm, "rotary_emb"):
        return Support.no("no rotary embedding module found on the language model")
    return Support.yes()


class DecoderRunner:
    """Forward over ``[batch, tokens]`` with a ``StaticKVCache``; returns logits of the last token of each row."""

    def __init__(self, model: torch.nn.Module, adapter: ModelAdapter) -> None:
        self.model = model
        self.adapter = adapter
        config = adapter.get_text_config(model)
        lm = adapter.get_language_model(model)
        self.embed = lm.get_submodule(adapter.embed_tokens)
        self.final_norm = lm.get_submodule(adapter.final_norm)
        self.lm_head = adapter.get_lm_head(model)
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        self.rotary = lm.rotary_emb
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.vocab_size = config.vocab_size
        self.layers = [self._layer_parts(layer, config) for layer in adapter.get_layers(model)]
        self._rope_len = 0
        self._cos = self._sin = torch.empty(0)

    def _layer_parts(self, layer: torch.nn.Module, config: Any) -> LayerParts:
        adapter = self.adapter
        attention = getattr(layer, adapter.attention)
        norms = [getattr(layer, n) for n in adapter.layer_norms]
        q_norm, k_norm = (getattr(attention, n, None) for n in ("q_norm", "k_norm")) if adapter.qk_norms else (
            None, None)
        # Per-layer windows live on the attention module (Qwen2/3); model-wide ones only on the config (Mistral).
        window = (attention.sliding_window if hasattr(attention, "sliding_window")
                  else getattr(config, "sliding_window", None)) or 0
        scale = getattr(attention, "scaling", None) or self.head_dim**-0.5
        return LayerParts(
            input_norm=norms[0], post_attention_norm=norms[1],
            projections=tuple(getattr(attention, n) for n in adapter.attention_projections),
            fused_qkv=getattr(attention, "flux_fused_qkv", None),
            q_norm=q_norm, k_norm=k_norm, mlp=getattr(layer, adapter.mlp), scale=float(scale), window=int(window),
        )

    # ---- tables and caches ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device  # embeddings always stay full precision (lm_head may be quantized)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def ensure_rope(self, length: int) -> None:
        """cos/sin tables for positions ``[0, length)``, computed by the model's own rotary module."""
        if length <= self._rope_len:
            return
        length = max(length, 2 * self._rope_len)
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.empty(1, dtype=torch.float32, device=self.device)
        cos, sin = self.rotary(probe, positions)
        self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
        self._rope_len = length

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        self.ensure_rope(max_len)
        return StaticKVCache(num_layers=len(self.layers), batch=batch, num_kv_heads=self.num_kv_heads,
                             max_len=max_len, head_dim=self.head_dim, dtype=self.dtype, device=self.device)

    # ---- forward ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache, meta: Any) -> torch.Tensor:
        """Logits (float32) of the tokens ``meta.logit_rows`` selects (each sequence's last token of this step);
        writes this step's K/V into ``cache``. ``cache``/``meta`` are a layout and its step metadata: the static
        layout takes ``[batch, tokens]`` rows, the paged layout one flat row of many sequences' tokens."""
        hidden = self.embed(input_ids)  # scaled embeddings (Gemma) scale inside the module
        residual: torch.Tensor | None = None
        for index, parts in enumerate(self.layers):
            x, residual = _add_norm(hidden, residual, parts.input_norm)
            attn = self._attention(index, parts, x, cache, meta)
            x, residual = _add_norm(attn, residual, parts.post_attention_norm)
            hidden = parts.mlp(x)
        x, _ = _add_norm(meta.logit_rows(hidden), meta.logit_rows(residual), self.final_norm)
        logits = self.lm_head(x).float()
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _attention(self, index: int, parts: LayerParts, x: torch.Tensor, cache: KVCache, meta: Any) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        o_proj = parts.projections[-1]
        if parts.fused_qkv is not None:
            q, k, v = parts.fused_qkv(x).split(parts.fused_qkv.sizes, dim=-1)
        elif len(parts.projections) == 4:
            q_proj, k_proj, v_proj, _ = parts.projections
            q, k, v = q_proj(x), k_proj(x), v_proj(x)
        else:
            q, k, v = parts.projections[0](x).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        if parts.q_norm is not None and parts.q_norm.weight.numel() != dim:  # OLMoE: norm over all heads
            q, k = parts.q_norm(q), parts.k_norm(k)
        q = q.reshape(batch, length, heads, dim)
        k = k.reshape(batch, length, kv_heads, dim)
        v = v.reshape(batch, length, kv_heads, dim)
        if parts.q_norm is not None and parts.q_norm.weight.numel() == dim:  # Qwen3, Gemma 3: per head
            q, k = parts.q_norm(q), parts.k_norm(k)
        out = cache.rotary_attend(index, q, k, v, self._cos, self._sin, meta, scale=parts.scale, window=parts.window)
        return o_proj(out.reshape(batch, length, heads * dim))


def _add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add feeding ``norm`` (fused when ``norm`` is flux's), as transformers orders it."""
    if residual is None:
        return norm(x), x
    weight_offset = getattr(norm, "weight_offset", None)
    if weight_offset is not None:  # FluxRMSNorm: one kernel for the add and the norm
        return kernels.add_rms_norm(x, residual, norm.weight, norm.eps, weight_offset)
    summed = residual + x
    return norm(summed), summed
