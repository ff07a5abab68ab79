"""``torch.ops.flux.prefetch_l2``: pull tensors (the weights of a coming linear layer) into the GPU's L2 cache.

A decode step at batch 1 alternates bandwidth-bound linear layers with short latency-bound kernels (norms, rotary,
attention) during which DRAM idles. Prefetching the next layer's weights then lets that layer read them from L2.
A hint only: no result and no effect on any value, so the reference does nothing.
"""

from __future__ import annotations

import torch

from flux_infer.kernels.registry import KernelOp

MAX_TENSORS = 4  # what one launch takes


def prefetch_l2_ref(tensors: list[torch.Tensor], max_bytes: int) -> None:
    """Prefetch up to ``max_bytes`` of ``tensors`` (in order) into L2; on the reference path, nothing."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"prefetch_l2 takes at most {MAX_TENSORS} tensors, got {len(tensors)}")


@torch.library.custom_op("flux::prefetch_l2", mutates_args=())
def _prefetch_l2_op(tensors: list[torch.Tensor], max_bytes: int) -> None:
    prefetch_l2_ref(tensors, max_bytes)


@_prefetch_l2_op.register_fake
def _(tensors, max_bytes) -> None:
    return None


prefetch_l2 = KernelOp("prefetch_l2", _prefetch_l2_op, prefetch_l2_ref)
