"""``QuantizedLinear`` and ``QuantizedExperts``: modules holding flux-format quantized weights.

Their buffers are what a quantized checkpoint stores: ``qweight``, ``scale`` (INT8) or ``scales``/``mins``
(INT4), ``bias``. Optional ``input_scale`` divides activations first (AWQ scales that could not be folded into a
preceding layer). An INT4 layer may hold its codes, scales and mins in the fragment layout instead
(``kernels/quant_frag.py``: ``to_fragments``), the form its decode-batch CUDA kernel streams; its ``state_dict``
still holds the checkpoint layout.
"""

from __future__ import annotations

from typing import Any

import torch

from flux_infer import kernels
from flux_infer.kernels import quant_frag
from flux_infer.kernels.quant import dequantize_int4, dequantize_int8
from flux_infer.quantization.rtn import quantize_int4, quantize_int8


class QuantizedLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None, bias: bool,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedLinear supports 4 or 8 bits, got {bits}")
        if bits == 4 and (group_size is None or in_features % group_size or in_features % 8):
            raise ValueError(f"INT4 needs in_features ({in_features}) divisible by the group size ({group_size}) and 8")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else None
        if bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features // 8, dtype=torch.int32,
                                                        device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("mins", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", None)  # GPTQ act-order checkpoints: input channels regrouped
        self.fragments = False  # INT4 codes, scales and mins in the fragment layout (set_fragments)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, bits: int,
                    group_size: int | None) -> QuantizedLinear:
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bits=bits, group_size=group_size, bias=bias is not None,
                     dtype=weight.dtype, device=weight.device)
        if bits == 8:
            module.qweight, module.scale = quantize_int8(weight)
        else:
            module.qweight, module.scales, module.mins = quantize_int4(weight, group_size)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    @property
    def weight_dtype(self) -> torch.dtype:
        return (self.scale if self.bits == 8 else self.scales).dtype

    # ---- the fragment layout (INT4, group 128) ---------------------------------------------------------------
    @property
    def fragments_fit(self) -> bool:
        """Whether this layer can take the fragment layout (and its CUDA kernel: bf16, 64 outputs at a time)."""
        return (self.bits == 4 and self.input_perm is None and self.weight_dtype == torch.bfloat16
                and self.out_features % 64 == 0 and quant_frag.fits(self.out_features, self.in_features,
                                                                   self.group_size))

    def set_fragments(self, enabled: bool, *, storage_only: bool = False) -> None:
        """Reorder the codes, scales and mins in place (their storage, so views of it follow) into the fragment
        layout, or back. ``storage_only``: the tensors were reordered through another module sharing their storage
        (a fused projection's buffers); only record the layout."""
        if enabled == self.fragments:
            return
        if enabled and not self.fragments_fit:
            raise ValueError(f"{self.extra_repr()}: the fragment layout needs INT4 with group 128, bf16 scales, "
                             "out_features a multiple of 64 and no input permutation")
        if not storage_only:
            convert = quant_frag.to_fragments if enabled else quant_frag.from_fragments
            with torch.no_grad():
                for buffer, value in zip((self.qweight, self.scales, self.mins),
                                         convert(self.qweight, self.scales, self.mins), strict=True):
                    buffer.copy_(value)
        self.fragments = enabled

    def checkpoint_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """INT4 ``(qweight, scales, mins)`` in the checkpoint layout (copies when held as fragments)."""
        if self.fragments:
            return quant_frag.from_fragments(self.qweight, self.scales, self.mins)
        return self.qweight, self.scales, self.mins

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.fragments:  # checkpoints hold the checkpoint layout
            for name, value in zip(("qweight", "scales", "mins"), self.checkpoint_buffers(), strict=True):
                destination[prefix + name] = value

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        fragments = self.fragments
        if fragments:  # what arrives is the checkpoint layout: load it as such, then reorder
            self.set_fragments(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if fragments:
            self.set_fragments(True)

    def dequantize(self) -> torch.Tensor:
        """The full-precision weight ``[out_features, in_features]`` these codes stand for."""
        if self.bits == 8:
            weight = dequantize_int8(self.qweight, self.scale, self.weight_dtype)
        else:
            qweight, scales, mins = self.checkpoint_buffers()
            weight = dequantize_int4(qweight, scales, mins, self.group_size, self.weight_dtype)
        if self.input_perm is not None:  # column j of the stored weight belongs to input channel input_perm[j]
            weight = torch.empty_like(weight).index_copy_(1, self.input_perm, weight)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.bits == 8:
            return kernels.int8_linear(x, self.qweight, self.scale, self.bias)
        if self.fragments:
            return quant_frag.int4f_linear(x, self.qweight, self.scales, self.mins, self.bias, "", None, 0.0)
        return kernels.int4_linear(x, self.qweight, self.scales, self.mins, self.group_size, self.bias)

    def gated(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        """``act(gate) * up`` for a layer whose rows are ``[gate; up]`` (a fused gate/up projection): on CUDA, for
        up to 32 rows (INT8: 2 to 32), the product is the matmul kernel's epilogue, one launch and half the output
        written; otherwise the layer and ``act_mul`` run apart (the same values)."""
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        if self.fragments:
            return quant_frag.int4f_linear(x, self.qweight, self.scales, self.mins, self.bias, activation, None, 0.0)
        mins = self.mins if self.bits == 4 else None
        scales = self.scales if self.bits == 4 else self.scale
        return kernels.quantized_gated_linear(x, self.qweight, scales, mins, self.group_size or 0, self.bias,
                                              activation)

    # ---- the layers around an RMSNorm (INT4; kernels/quant.py: a decode step without norm kernels) ----------
    @property
    def norm_fusable(self) -> bool:
        """Whether this layer can take a neighbouring RMSNorm into its epilogue (``add_norm``, ``norm_scaled``)."""
        return self.bits == 4 and self.input_perm is None

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h * norm_weight, h, partials)`` with ``h = residual + self(x)``: the layer, the residual add after it
        and the part of the next RMSNorm that needs all of h (its sums of squares, ``partials``)."""
        if self.fragments:
            return quant_frag.int4f_linear_add_norm(x, self.qweight, self.scales, self.mins, self.bias, residual,
                                                    norm_weight)
        return kernels.int4_linear_add_norm(x, self.qweight, self.scales, self.mins, self.group_size, self.bias,
                                            residual, norm_weight)

    def norm_scaled(self, x: torch.Tensor, partials: torch.Tensor, eps: float,
                    activation: str | None = None) -> torch.Tensor:
        """This layer on ``rms_norm(h)`` given ``x = h * norm_weight`` and ``add_norm``'s ``partials``: the norm's
        scale is applied to the layer's sums. ``activation``: a ``[gate; up]`` layer's ``act(gate) * up``."""
        if self.fragments:
            return quant_frag.int4f_linear(x, self.qweight, self.scales, self.mins, self.bias, activation or "",
                                           partials, eps)
        if activation is None:
            return kernels.int4_linear_norm_scaled(x, self.qweight, self.scales, self.mins, self.group_size,
                                                   self.bias, partials, eps)
        return kernels.int4_gated_linear_norm_scaled(x, self.qweight, self.scales, self.mins, self.group_size,
                                                     self.bias, partials, eps, activation)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        layout = ", fragments" if self.fragments else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}{layout}"


class QuantizedExperts(torch.nn.Module):
    """A mixture-of-experts block's stacked experts (transformers' ``*Experts``: ``gate_up_proj`` [E, 2I, H] and
    ``down_proj`` [E, H, I]), each expert's two matrices quantized; the routing loop is transformers' own."""

    def __init__(self, original: torch.nn.Module, *, bits: int, group_size: int | None, empty: bool = False) -> None:
        """Quantize ``original``'s experts (or, with ``empty=True``, make room for a checkpoint's)."""
        super().__init__()
        self.num_experts = original.num_experts
        self.act_fn = original.act_fn
        self.bits, self.group_size = bits, group_size

        def make(weight: torch.Tensor) -> QuantizedLinear:
            if empty:
                return QuantizedLinear(weight.shape[1], weight.shape[0], bits=bits, group_size=group_size, bias=False,
                                       dtype=weight.dtype, device=weight.device)
            return QuantizedLinear.from_weight(weight, None, bits=bits, group_size=group_size)

        self.gate_up = torch.nn.ModuleList(make(w) for w in original.gate_up_proj)
        self.down = torch.nn.ModuleList(make(w) for w in original.down_proj)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                **_: Any) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert])
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            out = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final
