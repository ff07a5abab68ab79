"""``Int8Cache``: transformers' cache interface with INT8 keys and values, for the model's own forward.

With ``kv_cache_int8`` applied, a forward that caches (``use_cache=True``) gets an ``Int8Cache`` when it was given
no cache (or an empty ``DynamicCache``, as transformers' own ``generate`` passes): keys and values are stored as
INT8 codes with one float32 scale per (token, head), like flux's paged INT8 pool, and dequantized when attention
reads them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from flux_infer import kernels


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged pool's INT8 quantization, with the scale kept as a trailing dim for broadcasting."""
    codes, scale = kernels.quantize_kv_int8(x)
    return codes, scale[..., None]


class Int8Layer(DynamicLayer):
    """One layer's INT8 keys/values ``[batch, heads, seq, head_dim]`` and scales ``[batch, heads, seq, 1]``."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self.keys = torch.empty(b, h, 0, d, dtype=torch.int8, device=self.device)
        self.values = torch.empty(b, h, 0, value_states.shape[-1], dtype=torch.int8, device=self.device)
        self.key_scales = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
        self.value_scales = torch.empty(b, h, 0, 1, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_codes, k_scale = _quantize(key_states)
        v_codes, v_scale = _quantize(value_states)
        self.keys = torch.cat([self.keys, k_codes], dim=-2)
        self.values = torch.cat([self.values, v_codes], dim=-2)
        self.key_scales = torch.cat([self.key_scales, k_scale], dim=-2)
        self.value_scales = torch.cat([self.value_scales, v_scale], dim=-2)
        return ((self.keys.float() * self.key_scales).to(self.dtype),
                (self.values.float() * self.value_scales).to(self.dtype))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.is_initialized:
            self.key_scales = self.key_scales[..., :tokens_to_remove, :]
            self.value_scales = self.value_scales[..., :tokens_to_remove, :]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.is_initialized:
            self.key_scales = self.key_scales.repeat_interleave(repeats, dim=0)
            self.value_scales = self.value_scales.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.is_initialized:
            self.key_scales = self.key_scales[indices, ...]
            self.value_scales = self.value_scales[indices, ...]


class Int8Cache(Cache):
    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=Int8Layer)


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which this transformers release passes the cache (``cache`` from 5.2x, else
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def int8_cache_forward(original: Any, argument: str) -> Any:
    """A ``forward`` for the instance that swaps an absent or empty default cache for an ``Int8Cache``."""
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", False)
        given = kwargs.get(argument, kwargs.get("past_key_values"))
        if use_cache and (given is None or (type(given) is DynamicCache and given.get_seq_length() == 0)):
            kwargs.pop("past_key_values", None)
            kwargs[argument] = Int8Cache()
        return original(*args, **kwargs)

    return forward
