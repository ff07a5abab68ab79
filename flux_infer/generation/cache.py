"""KV cache layouts behind one interface, and the attention metadata planned once per step.

``StaticKVCache`` is the contiguous layout: every sequence of a batch owns slots ``[0, max_len)`` of
preallocated ``[layers, batch, kv_heads, max_len, head_dim]`` buffers. A left-padded prompt is stored as is;
``kv_start[b]`` (its padding length) hides the padding from attention. All rows write the same slot each step,
so one slot index serves the whole batch and a decode step has fixed shapes (CUDA-graph friendly).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from flux_infer import kernels

# A decode step over the static cache runs rotary embedding, cache write and attention as one CUDA kernel
# (flux::rotary_cache_attention) instead of the rotary kernel then cache_attention: a switch for A/B runs
# (benchmarks/decode.py's *_attnapart modes).
FUSED_ROTARY_ATTENTION = True


@dataclasses.dataclass
class StepMetadata:
    """Everything attention needs for one forward, computed once and shared by every layer.

    ``positions`` [B, T] rotary positions; ``slots`` [T] cache slots written by this step; ``kv_start``/``kv_end``
    [B] int32 valid slot range after the write; ``kv_len`` (host int) bounds the slots eager attention reads,
    or None to read the whole cache (graph mode, where the length lives on the device).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    kv_start: torch.Tensor
    kv_end: torch.Tensor
    kv_len: int | None
    _masks: dict[tuple[int, int], torch.Tensor] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def q_len(self) -> int:
        return self.positions.shape[1]

    def advance_(self, n: int = 1) -> None:
        """Move to the next ``n`` tokens in place (the tensors keep their storage: CUDA graphs read them)."""
        self.positions.add_(n)
        self.slots.add_(n)
        self.kv_end.add_(n)
        self._masks.clear()
        if self.kv_len is not None:
            self.kv_len += n

    def logit_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states whose logits are wanted: each row's last token, ``[B, hidden]``."""
        return hidden[:, -1]

    def reference_mask(self, kv_len: int, window: int) -> torch.Tensor:
        """The boolean mask of the reference attention, built once per step and window and shared by layers."""
        key = (kv_len, window)
        if key not in self._masks:
            self._masks[key] = kernels.cache_attention_mask(self.kv_start, self.kv_end, self.q_len, kv_len, window)
        return self._masks[key]


def prefill_metadata(attention_mask: torch.Tensor) -> StepMetadata:
    """Metadata for a left-padded prompt batch written at slots ``[0, T)``."""
    mask = attention_mask.long()
    batch, length = mask.shape
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    kv_start = (length - mask.sum(-1)).to(torch.int32)
    return StepMetadata(
        positions=positions,
        slots=torch.arange(length, device=mask.device),
        kv_start=kv_start,
        kv_end=torch.full((batch,), length, dtype=torch.int32, device=mask.device),
        kv_len=length,
    )


def decode_metadata(prefill: StepMetadata) -> StepMetadata:
    """Metadata for the first decode step after ``prefill`` (fresh tensors; advance them in place afterwards)."""
    length = prefill.q_len
    positions = prefill.positions[:, -1:].clone() + 1
    return StepMetadata(
        positions=positions,
        slots=torch.tensor([length], device=positions.device),
        kv_start=prefill.kv_start.clone(),
        kv_end=prefill.kv_end.clone() + 1,
        kv_len=length + 1,
    )


def is_left_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is zeros then ones (what left padding produces)."""
    mask = attention_mask.long()
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


class KVCache(Protocol):
    """What the runner needs from a cache layout, given the layout's own step metadata."""

    def append_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: Any) -> None: ...

    def attend(self, layer: int, q: torch.Tensor, meta: Any, *, scale: float, window: int) -> torch.Tensor: ...

    def rotary_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: Any, *, scale: float, window: int) -> torch.Tensor: ...


class StaticKVCache:
    """Contiguous KV cache; ``append_rotary`` writes this step's keys/values, ``attend`` reads the valid slots."""

    def __init__(self, *, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len

    def fits(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> bool:
        return batch <= self.batch and length <= self.max_len and self.k.dtype == dtype and self.k.device == device

    def append_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: StepMetadata) -> None:
        """Rotate q, k ``[B, T, heads, head_dim]`` in place and store k, v at ``meta.slots`` (one kernel on CUDA)."""
        kernels.rotary_cache_write_(q, k, v, cos, sin, meta.positions, self.k[layer], self.v[layer], meta.slots)

    def rotary_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: StepMetadata, *, scale: float, window: int) -> torch.Tensor:
        """``append_rotary`` then ``attend``; a decode step on CUDA whose tensors the one-launch kernel takes (16-bit,
        head_dim 64 or 128, ...: ``kernels.rotary_attention_fits``) runs both as that kernel (q and k are then left
        unrotated: only the result and the cache are defined); others rotate q and k in place as before."""
        if (FUSED_ROTARY_ATTENTION and kernels.rotary_cache_attention.native(q.device)
                and kernels.rotary_attention_fits(q, k, v, cos, sin, meta.positions, self.k[layer], self.v[layer],
                                                  meta.slots, meta.kv_start, meta.kv_end)):
            return kernels.rotary_cache_attention(q, k, v, cos, sin, meta.positions, self.k[layer], self.v[layer],
                                                  meta.slots, meta.kv_start, meta.kv_end, scale, window)
        self.append_rotary(layer, q, k, v, cos, sin, meta)
        return self.attend(layer, q, meta, scale=scale, window=window)

    def attend(self, layer: int, q: torch.Tensor, meta: StepMetadata, *, scale: float, window: int) -> torch.Tensor:
        """q ``[B, T, heads, head_dim]`` -> ``[B, T, heads, head_dim]`` over the valid slots of each row."""
        batch = q.shape[0]
        if kernels.cache_attention.native(q.device):
            # the device kernel reads the valid range itself: hand it the whole cache, so the eager and the
            # graph-captured steps run the identical computation
            end = self.max_len if q.shape[1] == 1 or meta.kv_len is None else meta.kv_len
            k, v = self.k[layer, :batch, :, :end], self.v[layer, :batch, :, :end]
            return kernels.cache_attention(q, k, v, meta.kv_start, meta.kv_end, scale, window)
        end = self.max_len if meta.kv_len is None else meta.kv_len
        k, v = self.k[layer, :batch, :, :end], self.v[layer, :batch, :, :end]
        return kernels.masked_attention_ref(q, k, v, meta.reference_mask(end, window), scale)
