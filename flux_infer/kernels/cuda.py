"""Builds the CUDA kernels of ``flux_infer/csrc`` on first use and registers them with their ops.

The build (``torch.utils.cpp_extension``) targets the GPU in use and is cached in one place:
``$FLUX_INFER_BUILD_DIR``, else ``<flux cache>/build/<torch version>-<cuda version>-sm<arch>``. Without CUDA or
a compiler the build is skipped, the reference implementations keep running, and ``status()`` says why.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from flux_infer.kernels import activation, attention, matmul, norm, quant, quant_frag, rotary

logger = logging.getLogger(__name__)

ENV_BUILD_DIR = "FLUX_INFER_BUILD_DIR"
ENV_DISABLE = "FLUX_INFER_DISABLE_CUDA_KERNELS"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
QUANT_MMA_MAX_ROWS = 32  # quantized linear layers: tensor-core kernel up to here, Triton above, and from these
# rows (INT4, INT8) on cuBLAS over the weight dequantized once: the crossovers measured by benchmarks/prefill_quant.py
DEQUANT_MATMUL_MIN_ROWS = {4: 128, 8: 320}
# (out_features, in_features) -> (warps, row tiles, INT4 form, launch shape) of the tensor-core kernel up to 8 rows,
# instead of its launch plan (quant_linear.cu's choose_plan): a tuning hook, and the A/B of plan changes
# (benchmarks/decode.py's *_qkvbiased mode and --plans)
QUANT_MMA_PLANS: dict[tuple[int, int], tuple[int, int, int, int]] = {}
AUTO_PLAN = (0, 0, 0, -1)  # the same four arguments left to the launcher
FRAG_MAX_ROWS = 112  # fragment-layout INT4 layers: their kernel (16 rows a launch) up to here, cuBLAS on the
# dequantized weight above (estimated, not measured: launches of 16 rows cost about one 16-row call each, 25 us on
# Llama-3-8B's gate/up, against about 190 us for dequantize + cuBLAS at 128 rows)
NORM_EPILOGUE_MAX_ROWS = 8  # the INT4 layers around an RMSNorm (quant_linear_norm.cu) run in the kernel up to here
# (blocks per (row, kv head), warps per block) of the one-launch decode attention; 0 = chosen by the launcher
ROTARY_ATTENTION_LAUNCH = (0, 0)
HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)  # what the elementwise kernels compute in float32
MAX_SHARED_HIDDEN = 12288  # rms_norm stages a row of float32 in 48 KiB of shared memory

_lock = threading.Lock()
_state: dict[str, Any] = {"attempted": False, "loaded": False, "error": None}


def build_dir() -> Path:
    env = os.environ.get(ENV_BUILD_DIR)
    if env:
        return Path(env)
    from flux_infer.loading import cache_root

    major, minor = torch.cuda.get_device_capability()
    return cache_root() / "build" / f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{major}{minor}"


def status() -> str:
    """"loaded", "not loaded", or the reason the build failed."""
    if _state["loaded"]:
        return "loaded"
    return _state["error"] or "not loaded"


def load() -> bool:
    """Register the device kernels (building the extension, or loading its cached build) once per process.

    Returns True when the compiled kernels are in use. The Triton attention kernel registers independently of
    the compiled extension.
    """
    with _lock:
        if _state["attempted"]:
            return _state["loaded"]
        _state["attempted"] = True
        if os.environ.get(ENV_DISABLE):
            _state["error"] = f"disabled by {ENV_DISABLE}"
            return False
        if not torch.cuda.is_available():
            _state["error"] = "no CUDA device"
            return False
        from flux_infer.kernels import triton_attention

        if triton_attention.available():
            from flux_infer.kernels import triton_paged_attention

            attention.cache_attention.register("cuda", triton_attention.cache_attention_cuda, "triton")
            attention.paged_attention.register("cuda", triton_paged_attention.paged_attention_cuda, "triton")
            attention.paged_kv_write_.register("cuda", triton_paged_attention.paged_kv_write_cuda, "triton")
        try:
            module = _build()
        except Exception as exc:  # no nvcc, no ninja, compiler error: keep the reference path
            _state["error"] = f"CUDA kernels could not be built ({type(exc).__name__}: {str(exc)[:300]})"
            logger.warning("flux_infer: %s; using the PyTorch reference kernels", _state["error"])
            return False
        _register(module)
        _state["loaded"] = True
        _state["module"] = module
        return True


def _build() -> Any:
    from torch.utils.cpp_extension import load as load_extension

    major, minor = torch.cuda.get_device_capability()
    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    return load_extension(
        name="flux_infer_kernels",
        sources=[str(CSRC / name) for name in ("flux_kernels.cu", "quant_linear.cu", "quant_linear_gated.cu",
                                                  "quant_linear_norm.cu", "quant_linear_norm_gated.cu",
                                                  "quant_frag.cu", "decode_attention.cu")],
        build_directory=str(target),
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
        extra_cflags=["-O3"],
        verbose=False,
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, hidden]`` with a unit stride in the last dim (copying only if it must)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``_rows(x)`` whose rows also start on 16-byte boundaries, as the quantized kernels read them (copying only
    if it must)."""
    rows = _rows(x)
    return rows.contiguous() if rows.stride(0) % 8 or rows.data_ptr() % 16 else rows


def _quant_plan(rows: int, qweight: torch.Tensor, k: int) -> tuple[int, int, int, int]:
    """The quantized kernel's launch arguments: ``QUANT_MMA_PLANS``' entry for the shape up to 8 rows, else chosen."""
    return QUANT_MMA_PLANS.get((qweight.shape[0], k), AUTO_PLAN) if rows <= 8 else AUTO_PLAN


def programmatic_launch() -> bool:
    """Whether flux's CUDA kernels are launched with programmatic dependent launch on the current device."""
    return bool(_state["loaded"]) and _state["module"].programmatic_launch()


def early_trigger() -> bool:
    """Whether flux's linear-layer and decode-attention kernels, for up to ``early_trigger_rows()`` rows
    (sequences; one by default), let the next kernel launch from their start (its blocks then wait for this kernel's
    results, but a linear layer among them streams its first weights meanwhile) rather than after their main loop.
    On by default (faster at batch 1, slower at 16: docs/benchmarks.md); ``set_early_trigger`` switches it for A/B
    runs."""
    return bool(_state["loaded"]) and _state["module"].early_trigger()


def early_trigger_rows() -> int:
    """Up to how many rows (sequences) the early trigger applies (1 unless ``set_early_trigger`` said more)."""
    return _state["module"].early_trigger_rows() if _state["loaded"] else 1


def trigger_early(rows: int) -> bool:
    """Whether a decode kernel over ``rows`` rows (sequences) lets its dependents launch from its start (the
    extension's own rule, flux::trigger_early, which its CUDA kernels follow)."""
    return bool(_state["loaded"]) and _state["module"].trigger_early(rows)


def set_early_trigger(enabled: bool, max_rows: int = 1) -> None:
    if max_rows < 1:
        raise ValueError(f"set_early_trigger: max_rows must be at least 1, got {max_rows}")
    if load():
        _state["module"].set_early_trigger(enabled, max_rows)


FRAG_PROGRAMMATIC_BYTES = 16 << 20  # the fragment kernel's default (csrc/quant_frag.cu, FragLaunch)


def set_frag_launch(programmatic_bytes: int = FRAG_PROGRAMMATIC_BYTES, all_programmatic: bool = False,
                    early: bool = True) -> None:
    """How fragment-layout INT4 calls above one row launch: programmatically for layers of at most
    ``programmatic_bytes`` weight bytes (triggering their dependents at their start, or with ``early=False`` after
    their main loop), plainly above (``all_programmatic``: every call programmatic, the larger ones triggering
    after their main loop). For A/B runs (benchmarks/decode.py); the defaults are the measured choice."""
    if load():
        _state["module"].set_frag_launch(programmatic_bytes, all_programmatic, early)


# (out_features, in_features, epilogue) -> (warps, K splits) of fragment-layout calls, epilogue one of
# FRAG_EPILOGUES: for A/B runs (benchmarks/decode.py --frag-plans); absent: the launcher's plan
FRAG_EPILOGUES = ("plain", "gated", "norm_scaled", "add_norm")
FRAG_PLANS: dict[tuple[int, int, str], tuple[int, int]] = {}


def _frag_plan(qweight: torch.Tensor, epilogue: str) -> tuple[int, int]:
    return FRAG_PLANS.get((qweight.shape[0], qweight.shape[1] * 8, epilogue), (0, 0))


def _token_heads(t: torch.Tensor) -> torch.Tensor | None:
    """``t [..., heads, head_dim]`` as a ``[tokens, heads, head_dim]`` view with a unit stride in head_dim (q and k
    may be views into a fused q/k/v projection's output), or None when no such view exists."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        return None


def _register(module: Any) -> None:
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
        if x.shape[-1] > MAX_SHARED_HIDDEN or weight.dtype != x.dtype:
            return norm.rms_norm_ref(x, weight, eps, weight_offset)
        (out,) = module.rms_norm(_rows(x), None, weight.contiguous(), eps, weight_offset)
        return out.view(x.shape)

    def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     weight_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] > MAX_SHARED_HIDDEN or weight.dtype != x.dtype or residual.dtype != x.dtype:
            return norm.add_rms_norm_ref(x, residual, weight, eps, weight_offset)
        out, summed = module.rms_norm(_rows(x), _rows(residual), weight.contiguous(), eps, weight_offset)
        return out.view(x.shape), summed.view(x.shape)

    def act_mul(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
        if kind not in activation.ACTIVATIONS or gate.dtype not in HALF_AND_FLOAT or up.dtype != gate.dtype:
            return activation.act_mul_ref(gate, up, kind)  # unknown kinds: the reference's clear error
        shape = gate.shape
        out = module.act_mul(_rows(gate), _rows(up), activation.ACTIVATIONS.index(kind))
        return out.view(shape)

    def rotary_embedding_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor) -> None:
        q3, k3 = _token_heads(q), _token_heads(k)
        if cos.dtype != torch.float32 or q3 is None or k3 is None:
            return rotary.rotary_embedding_ref(q, k, cos, sin, positions)
        module.rotary_embedding(q3, k3, cos, sin, positions.reshape(-1).contiguous(), None, None, None, None)

    def rotary_cache_write_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slots: torch.Tensor) -> None:
        q3, k3, v3 = _token_heads(q), _token_heads(k), _token_heads(v)
        if (cos.dtype != torch.float32 or q3 is None or k3 is None or v3 is None
                or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1):
            return rotary.rotary_cache_write_ref(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
        module.rotary_embedding(q3, k3, cos, sin, positions.reshape(-1).contiguous(), v3, k_cache, v_cache,
                                slots.contiguous())

    def rotary_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, slots: torch.Tensor, kv_start: torch.Tensor,
                               kv_end: torch.Tensor, scale: float, window: int) -> torch.Tensor:
        """The one-launch kernel where it applies (one new token per row, 16-bit, head_dim 64 or 128, up to 8 query
        heads per kv head); otherwise the rotary kernel and ``cache_attention`` on copies of q and k."""
        if attention.rotary_attention_fits(q, k, v, cos, sin, positions, k_cache, v_cache, slots, kv_start, kv_end):
            out = module.rotary_attention(q[:, 0], k[:, 0], v[:, 0], cos, sin, positions.reshape(-1), k_cache,
                                          v_cache, slots, kv_start, kv_end, scale, window, *ROTARY_ATTENTION_LAUNCH)
            return out.view(q.shape)
        q, k = q.clone(), k.clone()
        rotary_cache_write_(q, k, v, cos, sin, positions, k_cache, v_cache, slots)
        rows = q.shape[0]
        return attention.cache_attention(q, k_cache[:rows], v_cache[:rows], kv_start, kv_end, scale, window)

    def linear_cuda(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if (0 < rows <= matmul.GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
                and weight.is_contiguous() and x.shape[-1] % 8 == 0 and (bias is None or bias.dtype == x.dtype)):
            x2 = x.reshape(rows, x.shape[-1])
            if x2.stride(-1) == 1 and x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0:
                return module.gemv(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])
        return matmul.linear_ref(x, weight, bias)

    def layout_fits(x: torch.Tensor, mins: torch.Tensor | None, group: int) -> bool:
        """What the compiled quantized kernels need beyond ``quantized``'s checks: INT8 (``mins`` None) inputs in
        16s, INT4 groups of 32s."""
        return x.shape[-1] % 16 == 0 if mins is None else group % 32 == 0

    def quantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                  group: int, bias: torch.Tensor | None, activation: int = -1) -> torch.Tensor | None:
        """Tensor-core kernel for up to 32 rows (INT8 single rows: the CUDA-core GEMV), Triton above, cuBLAS on the
        dequantized weight for long prefills; None when the shapes need the reference. ``activation`` >= 0: a gated
        ``[gate; up]`` layer, only on the tensor-core kernel (None otherwise: the caller runs the layer and
        ``act_mul`` apart)."""
        from flux_infer.kernels import triton_quant

        if x.dtype not in (torch.bfloat16, torch.float16) or scales.dtype != x.dtype or x.numel() == 0:
            return None
        rows = x.numel() // x.shape[-1]
        gated = activation >= 0
        if gated and (rows > QUANT_MMA_MAX_ROWS or (rows == 1 and mins is None)):
            return None
        x2 = _aligned_rows(x)
        if qweight.data_ptr() % 16:
            return None
        if rows == 1 and mins is None:
            out = module.int8_gemv(x2, qweight, scales, bias)
        elif rows <= QUANT_MMA_MAX_ROWS:
            out = module.quant_mma(x2, qweight, scales, mins, group, bias, *_quant_plan(rows, qweight, x2.shape[1]),
                                   activation)
        elif rows >= DEQUANT_MATMUL_MIN_ROWS[8 if mins is None else 4] and qweight.is_contiguous():
            out = torch.nn.functional.linear(x2, module.dequantize_weight(qweight, scales, mins, group), bias)
        elif triton_quant.available():
            out = triton_quant.quant_matmul(x2, qweight, scales, mins, group, bias)
        else:
            return None
        return out.view(*x.shape[:-1], out.shape[-1])

    def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
        out = quantized(x, qweight, scale, None, 0, bias) if layout_fits(x, None, 0) else None
        return out if out is not None else quant.int8_linear_ref(x, qweight, scale, bias)

    def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
        out = quantized(x, qweight, scales, mins, group_size, bias) if layout_fits(x, mins, group_size) else None
        return out if out is not None else quant.int4_linear_ref(x, qweight, scales, mins, group_size, bias)

    def quantized_gated_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               mins: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                               activation_kind: str) -> torch.Tensor:
        """act(gate) * up in the tensor-core kernel's epilogue (up to 32 rows; INT8 from 2, its single rows keep
        the faster CUDA-core GEMV); otherwise, or where it cannot run, the layer and act_mul apart (same values)."""
        gated = activation_kind in activation.ACTIVATIONS and qweight.shape[0] % 2 == 0
        if gated and layout_fits(x, mins, group_size):
            out = quantized(x, qweight, scales, mins, group_size, bias,
                            activation.ACTIVATIONS.index(activation_kind))
            if out is not None:
                return out
        full = (int8_linear(x, qweight, scales, bias) if mins is None
                else int4_linear(x, qweight, scales, mins, group_size, bias))
        gate, up = full.chunk(2, dim=-1)
        return act_mul(gate, up, activation_kind)

    def norm_epilogue_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: int) -> int:
        """Rows of ``x`` when the INT4 norm-epilogue kernels take these shapes, else 0 (the reference runs)."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        fits = (0 < rows <= NORM_EPILOGUE_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
                and scales.dtype == x.dtype and group % 32 == 0 and qweight.data_ptr() % 16 == 0)
        return rows if fits else 0

    def int4_linear_add_norm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                             group_size: int, bias: torch.Tensor | None, residual: torch.Tensor,
                             norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, n = norm_epilogue_rows(x, qweight, scales, group_size), qweight.shape[0]
        if rows and norm_weight.dtype == x.dtype and residual.dtype == x.dtype:
            lead = x.shape[:-1]
            x2 = _aligned_rows(x)
            normed, h, partials = module.quant_mma_add_norm(
                x2, qweight, scales, mins, group_size, bias, _rows(residual), norm_weight.contiguous(),
                quant.norm_partial_slots(n), *_quant_plan(rows, qweight, x2.shape[1]))
            return normed.view(*lead, n), h.view(*lead, n), partials.view(*lead, partials.shape[-1])
        return quant.int4_linear_add_norm_ref(x, qweight, scales, mins, group_size, bias, residual, norm_weight)

    def norm_scaled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None, partials: torch.Tensor, eps: float,
                    activation_index: int) -> torch.Tensor | None:
        rows = norm_epilogue_rows(x, qweight, scales, group_size)
        if not rows:
            return None
        x2 = _aligned_rows(x)
        out = module.quant_mma_scale_norm(x2, qweight, scales, mins, group_size, bias,
                                          partials.reshape(rows, partials.shape[-1]).float().contiguous(), eps,
                                          *_quant_plan(rows, qweight, x2.shape[1]), activation_index)
        return out.view(*x.shape[:-1], out.shape[-1])

    def int4_linear_norm_scaled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                                group_size: int, bias: torch.Tensor | None, partials: torch.Tensor,
                                eps: float) -> torch.Tensor:
        out = norm_scaled(x, qweight, scales, mins, group_size, bias, partials, eps, -1)
        return out if out is not None else quant.int4_linear_norm_scaled_ref(x, qweight, scales, mins, group_size,
                                                                             bias, partials, eps)

    def int4_gated_linear_norm_scaled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                      mins: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                                      partials: torch.Tensor, eps: float, activation_kind: str) -> torch.Tensor:
        out = None
        if activation_kind in activation.ACTIVATIONS and qweight.shape[0] % 2 == 0:
            out = norm_scaled(x, qweight, scales, mins, group_size, bias, partials, eps,
                              activation.ACTIVATIONS.index(activation_kind))
        if out is not None:
            return out
        gate, up = int4_linear_norm_scaled(x, qweight, scales, mins, group_size, bias, partials, eps).chunk(2, -1)
        return act_mul(gate, up, activation_kind)

    def frag_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> int:
        """Rows of ``x`` when the fragment-layout kernel takes these shapes (any count: 16 per launch), else 0."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        fits = (x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16 and qweight.shape[0] % 64 == 0
                and qweight.data_ptr() % 16 == 0)
        return rows if fits else 0

    def int4f_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     bias: torch.Tensor | None, activation_kind: str, partials: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
        """The fragment kernel up to ``FRAG_MAX_ROWS`` rows (and for every RMSNorm-scaled call), cuBLAS on the
        dequantized weight above."""
        rows = frag_rows(x, qweight, scales)
        act = activation.ACTIVATIONS.index(activation_kind) if activation_kind in activation.ACTIVATIONS else -1
        if rows and (act >= 0 or not activation_kind):
            x2 = _aligned_rows(x).contiguous()
            if rows <= FRAG_MAX_ROWS or partials is not None:
                scale_rows = partials.reshape(rows, partials.shape[-1]).float().contiguous() if partials is not None \
                    else None
                epilogue = "gated" if act >= 0 else "norm_scaled" if scale_rows is not None else "plain"
                out = module.quant_frag(x2, qweight, scales, mins, bias, act, scale_rows, eps, None, None,
                                        quant_frag.counters(x.device), *_frag_plan(qweight, epilogue))[0]
            else:
                out = torch.nn.functional.linear(x2, module.frag_dequantize(qweight, scales, mins), bias)
                if act >= 0:
                    out = act_mul(*out.chunk(2, dim=-1), activation_kind)
            return out.view(*x.shape[:-1], out.shape[-1])
        return quant_frag.int4f_linear_ref(x, qweight, scales, mins, bias, activation_kind, partials, eps)

    def int4f_linear_add_norm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                              bias: torch.Tensor | None, residual: torch.Tensor, norm_weight: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, n = frag_rows(x, qweight, scales), qweight.shape[0]
        if rows and residual.dtype == torch.bfloat16 and norm_weight.dtype == torch.bfloat16:
            lead = x.shape[:-1]
            normed, h, partials = module.quant_frag(_aligned_rows(x).contiguous(), qweight, scales, mins, bias, -1,
                                                    None, 0.0, _rows(residual), norm_weight.contiguous(),
                                                    quant_frag.counters(x.device), *_frag_plan(qweight, "add_norm"))
            return normed.view(*lead, n), h.view(*lead, n), partials.view(*lead, partials.shape[-1])
        return quant_frag.int4f_linear_add_norm_ref(x, qweight, scales, mins, bias, residual, norm_weight)

    quant_frag.int4f_linear.register("cuda", int4f_linear, "cuda")
    quant_frag.int4f_linear_add_norm.register("cuda", int4f_linear_add_norm, "cuda")
    quant.int8_linear.register("cuda", int8_linear, "cuda")
    quant.int4_linear_add_norm.register("cuda", int4_linear_add_norm, "cuda")
    quant.int4_linear_norm_scaled.register("cuda", int4_linear_norm_scaled, "cuda")
    quant.int4_gated_linear_norm_scaled.register("cuda", int4_gated_linear_norm_scaled, "cuda")
    quant.quantized_gated_linear.register("cuda", quantized_gated_linear, "cuda")
    quant.int4_linear.register("cuda", int4_linear, "cuda")
    norm.rms_norm.register("cuda", rms_norm, "cuda")
    norm.add_rms_norm.register("cuda", add_rms_norm, "cuda")
    activation.act_mul.register("cuda", act_mul, "cuda")
    rotary.rotary_embedding_.register("cuda", rotary_embedding_, "cuda")
    rotary.rotary_cache_write_.register("cuda", rotary_cache_write_, "cuda")
    attention.rotary_cache_attention.register("cuda", rotary_cache_attention, "cuda")
    matmul.linear.register("cuda", linear_cuda, "cuda")
