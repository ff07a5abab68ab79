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
from flux_infer.adapters.base import ModelAdapter, NormStyle
from flux_infer.generation.cache import KVCache, StaticKVCache
from flux_infer.generation.norm_fusion import NormFusion, as_int4, plan_norm_fusion
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

    # Steps of up to norm_fusion.MAX_ROWS tokens (FRAGMENT_MAX_ROWS on fragment-layout layers) of an INT4 model run
    # without RMSNorm kernels (generation/norm_fusion.py): None = on CUDA, True = on any device (the CPU runs the
    # references: tests), False = never (benchmarks/decode.py's *_normapart modes).
    fuse_norms: bool | None = None

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
        self.norm_fusion: NormFusion | None = plan_norm_fusion(
            self.layers, self.final_norm, self.lm_head, adapter.norm_style is NormStyle.WEIGHT)
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
        if self._fuses_norms(hidden):
            logits = self._forward_norms_fused(hidden, cache, meta)
        else:
            residual: torch.Tensor | None = None
            for index, parts in enumerate(self.layers):
                x, residual = _add_norm(hidden, residual, parts.input_norm)
                attn = self._attend(index, parts, *self._qkv(parts, lambda m: m(x)), cache, meta)  # noqa: B023
                x, residual = _add_norm(parts.projections[-1](attn), residual, parts.post_attention_norm)
                hidden = parts.mlp(x)
            x, _ = _add_norm(meta.logit_rows(hidden), meta.logit_rows(residual), self.final_norm)
            logits = self.lm_head(x)
        logits = logits.float()
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def fuses_norms_on(self, device: torch.device) -> bool:
        """Whether decode steps of up to ``norm_fusion.max_rows`` tokens on ``device`` run the norms inside the
        INT4 layers around them (``fuse_norms``)."""
        if self.norm_fusion is None or self.fuse_norms is False:
            return False
        return self.fuse_norms is True or device.type == "cuda"

    def _fuses_norms(self, hidden: torch.Tensor) -> bool:
        return self.fuses_norms_on(hidden.device) and self.norm_fusion is not None and self.norm_fusion.fits(hidden)

    def _forward_norms_fused(self, hidden: torch.Tensor, cache: KVCache, meta: Any) -> torch.Tensor:
        """``forward``'s logits with every norm but the first inside the quantized layers around it
        (generation/norm_fusion.py)."""
        fusion = self.norm_fusion
        assert fusion is not None
        x, residual = _add_norm(hidden, None, self.layers[0].input_norm)
        partials: torch.Tensor | None = None  # sums of squares of the residual stream that x is a norm's input of
        last = len(self.layers) - 1
        for index, (parts, f) in enumerate(zip(self.layers, fusion.layers, strict=True)):
            if partials is None:  # layer 0: its input norm ran as a kernel
                q, k, v = self._qkv(parts, lambda m: m(x))  # noqa: B023
            else:
                eps, p = f.input_eps, partials
                q, k, v = self._qkv(parts, lambda m: as_int4(m).norm_scaled(x, p, eps))  # noqa: B023
            attn = self._attend(index, parts, q, k, v, cache, meta)
            x, residual, partials = f.o_proj.add_norm(attn, residual, f.post_weight)
            if f.gate_up is not None:
                act = f.gate_up.norm_scaled(x, partials, f.post_eps, f.activation)
            else:
                act = kernels.act_mul(f.gate.norm_scaled(x, partials, f.post_eps),
                                      f.up.norm_scaled(x, partials, f.post_eps), f.activation)
            if index < last:
                x, residual, partials = f.down.add_norm(act, residual, fusion.layers[index + 1].input_weight)
            elif fusion.lm_head is not None:
                x, _, partials = f.down.add_norm(act, residual, fusion.final_weight)
                return fusion.lm_head.norm_scaled(meta.logit_rows(x), meta.logit_rows(partials), fusion.final_eps)
            else:
                x, _ = _add_norm(meta.logit_rows(f.down(act)), meta.logit_rows(residual), self.final_norm)
                return self.lm_head(x)
        raise AssertionError("unreachable: the last layer returns the logits")

    def _qkv(self, parts: LayerParts, project: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v from the attention's input projections, each computed as ``project(module)``."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if parts.fused_qkv is not None:
            q, k, v = project(parts.fused_qkv).split(parts.fused_qkv.sizes, dim=-1)
        elif len(parts.projections) == 4:
            q, k, v = (project(m) for m in parts.projections[:3])
        else:
            q, k, v = project(parts.projections[0]).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return q, k, v

    def _attend(self, index: int, parts: LayerParts, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: KVCache, meta: Any) -> torch.Tensor:
        """Attention of this step's q, k, v over the cache (q/k norms, rotary, cache write): o_proj's input."""
        batch, length, _ = q.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if parts.q_norm is not None and parts.q_norm.weight.numel() != dim:  # OLMoE: norm over all heads
            q, k = parts.q_norm(q), parts.k_norm(k)
        q = q.reshape(batch, length, heads, dim)
        k = k.reshape(batch, length, kv_heads, dim)
        v = v.reshape(batch, length, kv_heads, dim)
        if parts.q_norm is not None and parts.q_norm.weight.numel() == dim:  # Qwen3, Gemma 3: per head
            q, k = parts.q_norm(q), parts.k_norm(k)
        out = cache.rotary_attend(index, q, k, v, self._cos, self._sin, meta, scale=parts.scale, window=parts.window)
        return out.reshape(batch, length, heads * dim)


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
