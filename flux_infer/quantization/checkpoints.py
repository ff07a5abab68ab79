"""Quantized checkpoints: flux's own (save and load), and GPTQ / AWQ checkpoints read into flux's format.

A flux checkpoint is a ``save_pretrained``-style directory whose ``config.json`` carries
``quantization_config = {"quant_method": "flux", "modules": {name: {"bits", "group_size"}}, ...}`` and whose
weights are in ``flux-quantized.safetensors`` (a different name than transformers' on purpose: plain
``from_pretrained`` must fail loudly on it rather than load random weights).

GPTQ (``quant_method: gptq``, formats v1 and v2, with or without act-order) and AWQ (``quant_method: awq``, GEMM
layout) 4-bit checkpoints are unpacked once at load time and repacked into flux's INT4 layout, so they run on
flux's kernels; neither auto-gptq nor autoawq is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from flux_infer.errors import ModelLoadError
from flux_infer.kernels.quant import pack_int4
from flux_infer.quantization.modules import QuantizedExperts, QuantizedLinear

FLUX_WEIGHTS = "flux-quantized.safetensors"
FORMAT_VERSION = 1
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ-packed int32 holds output column 8c + AWQ_ORDER[i]


# ---- saving ----------------------------------------------------------------------------------------------------
def save_quantized(model: torch.nn.Module, path: str | os.PathLike[str], **_: Any) -> None:
    """Write ``model`` (with flux-quantized layers) to ``path`` as a flux checkpoint."""
    from safetensors.torch import save_file

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    modules, experts = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedExperts):
            experts[name] = {"bits": module.bits, "group_size": module.group_size}
        elif isinstance(module, QuantizedLinear) and not any(name.startswith(e + ".") for e in experts):
            modules[name] = {"bits": module.bits, "group_size": module.group_size,
                             "bias": module.bias is not None, "input_perm": module.input_perm is not None}
    config = model.config
    previous = getattr(config, "quantization_config", None)
    config.quantization_config = {"quant_method": "flux", "format": FORMAT_VERSION, "modules": modules,
                                  "experts": experts}
    try:
        config.save_pretrained(target)
    finally:
        if previous is None:
            del config.quantization_config
        else:
            config.quantization_config = previous
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    save_file(_independent_tensors(model.state_dict()), str(target / FLUX_WEIGHTS), metadata={"format": "pt"})


def _independent_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: tied tensors (one storage, fully covered) once, under their first
    name (transformers ties them again on load); views into a larger buffer (fused projections) as copies."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.nbytes)
        if tensor.nbytes and key in seen:
            continue
        seen.add(key)
        whole = tensor.untyped_storage().nbytes() == tensor.nbytes and tensor.is_contiguous()
        out[name] = tensor.detach() if whole else tensor.detach().contiguous().clone()
    return out


# ---- loading -----------------------------------------------------------------------------------------------------
def quantization_method(directory: str | os.PathLike[str]) -> str | None:
    """The ``quant_method`` of a local checkpoint directory's config, if any."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        return None
    quantization = json.loads(config_file.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method")


def load_quantized(directory: str | os.PathLike[str], *, dtype: torch.dtype, device: torch.device,
                   **kwargs: Any) -> torch.nn.Module:
    """Build the model of a flux, GPTQ or AWQ checkpoint with flux's quantized modules and load its weights."""
    from transformers import AutoConfig

    from flux_infer.loading import model_class_for

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=kwargs.get("trust_remote_code", False))
    quantization = config.quantization_config
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    del config.quantization_config
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    method = quantization.get("quant_method")
    with torch.device(device):
        model = model_class_for(config).from_config(config, dtype=dtype)
    state = _read_safetensors(directory, FLUX_WEIGHTS if method == "flux" else None, device)
    if method == "flux":
        _shells_for_flux(model, quantization, dtype)
    elif method in ("gptq", "awq"):
        state = _convert_packed(model, state, quantization, dtype)
    else:
        raise ModelLoadError(f"quantization method {method!r} is not supported by flux_infer.load (flux, gptq, awq)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights are saved once: a missing name is fine when a name sharing its tensor was loaded
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    loaded = set(state)
    missing = [k for k in missing if not any(n in loaded for names in owners.values() if k in names for n in names)]
    if missing or unexpected:
        raise ModelLoadError(f"{directory} does not match its config: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
    model.tie_weights()
    return model.eval()


def _read_safetensors(directory: Path, name: str | None, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [directory / name] if name else sorted(directory.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        raise ModelLoadError(f"no weights found in {directory} (expected {name or '*.safetensors'})")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file), device=str(device)))
    return state


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def _shells_for_flux(model: torch.nn.Module, quantization: dict[str, Any], dtype: torch.dtype) -> None:
    for name, spec in quantization.get("experts", {}).items():
        _replace(model, name, QuantizedExperts(model.get_submodule(name), bits=spec["bits"],
                                               group_size=spec["group_size"], empty=True))
    for name, spec in quantization.get("modules", {}).items():
        original = model.get_submodule(name)
        shell = QuantizedLinear(original.in_features, original.out_features, bits=spec["bits"],
                                group_size=spec["group_size"], bias=spec["bias"], dtype=dtype,
                                device=original.weight.device)
        if spec.get("input_perm"):
            shell.input_perm = torch.empty(original.in_features, dtype=torch.long, device=original.weight.device)
        _replace(model, name, shell)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` packed along R (8 per int32, lowest nibble first) -> ``[8R, C]`` values 0..15."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    values = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
    return values.reshape(-1, packed.shape[1])


def _unpack_columns(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 ``[R, C]`` packed along C -> ``[R, 8C]``; nibble i of column c is column ``8c + order[i]``."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    values = (packed[:, :, None] >> shifts) & 0xF  # [R, C, 8] in nibble order
    inverse = torch.empty(8, dtype=torch.long)
    inverse[list(order)] = torch.arange(8)
    return values[:, :, inverse.to(packed.device)].reshape(packed.shape[0], -1)


def _convert_packed(model: torch.nn.Module, state: dict[str, torch.Tensor], quantization: dict[str, Any],
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace each GPTQ/AWQ-packed linear with a flux INT4 module; returns the remaining state dict."""
    method = quantization["quant_method"]
    bits = int(quantization.get("bits", quantization.get("w_bit", 4)))
    if bits != 4:
        raise ModelLoadError(f"{method} checkpoints with {bits} bits are not supported; flux reads 4-bit GPTQ/AWQ")
    if method == "awq" and str(quantization.get("version", "gemm")).lower() != "gemm":
        raise ModelLoadError(f"AWQ version {quantization.get('version')!r} is not supported; flux reads the GEMM "
                             "layout")
    v1 = method == "gptq" and quantization.get("checkpoint_format", "gptq") == "gptq"
    prefixes = sorted(k[: -len(".qweight")] for k in state if k.endswith(".qweight"))
    for prefix in prefixes:
        qweight, qzeros, scales = (state.pop(f"{prefix}.{n}") for n in ("qweight", "qzeros", "scales"))
        g_idx = state.pop(f"{prefix}.g_idx", None)
        bias = state.pop(f"{prefix}.bias", None)
        if method == "gptq":
            codes = _unpack_rows(qweight)  # [K, N]
            zeros = _unpack_columns(qzeros) + (1 if v1 else 0)  # [G, N]
        else:
            codes = _unpack_columns(qweight, AWQ_ORDER)  # [K, N]
            zeros = _unpack_columns(qzeros, AWQ_ORDER)
        in_features, out_features = codes.shape
        groups = scales.shape[0]
        group_size = in_features // groups
        if group_size * groups != in_features or group_size % 8:
            raise ModelLoadError(f"{prefix}: {groups} groups do not evenly divide {in_features} input channels")
        perm = None
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(in_features) // group_size):
            perm = torch.argsort(g_idx.long(), stable=True)  # act-order: regroup input channels contiguously
            codes = codes[perm]
        module = QuantizedLinear(in_features, out_features, bits=4, group_size=group_size, bias=bias is not None,
                                 dtype=dtype, device=codes.device)
        module.qweight = pack_int4(codes.T.contiguous())
        module.scales = scales.T.contiguous().to(dtype)
        module.mins = (-zeros.float() * scales.float()).T.contiguous().to(dtype)
        if bias is not None:
            module.bias = bias.to(dtype)
        if perm is not None:
            module.input_perm = perm.to(codes.device)
        _replace(model, prefix, module)
        for name, tensor in module.state_dict().items():
            state[f"{prefix}.{name}"] = tensor
    return state
