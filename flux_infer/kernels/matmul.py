"""``torch.ops.flux.linear``: ``x @ weight.T + bias`` with a bandwidth-bound GEMV for decode-sized batches.

At a few rows a linear layer only streams its weight; the CUDA kernel reads it with 16-byte non-caching loads,
one warp per output row. Larger batches (and the CPU) use PyTorch's ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flux_infer.kernels.registry import KernelOp

GEMV_MAX_ROWS = 1  # rows of x up to which the CUDA GEMV beats cuBLAS (measured: benchmarks/gemv.py)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@torch.library.custom_op("flux::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``."""
    return linear_ref(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear = KernelOp("linear", _linear_op, linear_ref)
