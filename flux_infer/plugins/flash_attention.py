"""``flash_attention``: the model's attention runs on flux's attention function.

The function is registered under the name ``"flux"`` in transformers' ``AttentionInterface`` (and its mask
interface), the documented extension point, and selected by setting ``_attn_implementation`` on this model's
own (text) config; no transformers module is edited.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.support import Support

ATTENTION_NAME = "flux"
_registered = False
_lock = threading.Lock()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def flux_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, q_len, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, kv_len, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' AttentionInterface; returns ``[batch, q_len, heads, head_dim]``."""
    if kwargs.get("softcap") is not None:
        raise ValueError("flux attention does not soft-cap logits; this model should have been skipped by the plan")
    q_len = query.shape[2]
    n_rep = query.shape[1] // key.shape[1]
    sdpa_kwargs = {}
    if n_rep > 1:
        if attention_mask is None and query.is_cuda:
            sdpa_kwargs["enable_gqa"] = True  # no copy of K/V; the flash/cuDNN backends handle GQA natively
        else:
            key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    causal = q_len > 1 and attention_mask is None and (is_causal if is_causal is not None else
                                                       getattr(module, "is_causal", True))
    if causal and key.shape[2] > q_len:  # prefill into an empty preallocated cache: only the first q_len count
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, **sdpa_kwargs)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``"flux"`` with transformers' attention and mask interfaces (idempotent, additive)."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, flux_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _registered = True


class FlashAttentionPlugin(Plugin):
    name = "flash_attention"
    description = "attention on flux's attention function (PyTorch SDPA, native GQA on CUDA)"
    provides = frozenset({"attention"})
    config_field = "use_flash_attention"

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        assert ctx.adapter is not None
        language_model = ctx.adapter.get_language_model(model)
        if not getattr(language_model, "_supports_attention_backend", False):
            return Support.no(f"{type(language_model).__name__} does not dispatch attention through "
                              "transformers' AttentionInterface")
        softcap = getattr(ctx.adapter.get_text_config(model), "attn_logit_softcapping", None)
        if softcap is not None:
            return Support.no(f"attention logit soft-capping (attn_logit_softcapping={softcap}) is not supported "
                              "by PyTorch SDPA")
        return Support.yes()

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        assert ctx.adapter is not None
        register_attention()
        ctx.patch.setattr(ctx.adapter.get_text_config(model), "_attn_implementation", ATTENTION_NAME)
        ctx.use_kernel("attention", "sdpa")
