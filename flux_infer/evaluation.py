"""Perplexity, the quality signal for lossy plugins (quantization, INT8 KV cache).

The default evaluation text is the Python standard library's ``pydoc_data.topics`` (about 465 K characters of
English documentation, on every Python); quantization calibrates on the end of the same corpus, which
``evaluation_text`` never reaches for the token counts used here.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def evaluation_text(characters: int = 200_000) -> str:
    """The first ``characters`` of the corpus (32 K SmolLM2 tokens need about 110 K characters)."""
    return corpus()[:characters]


def calibration_text(characters: int = 60_000) -> str:
    """The last ``characters`` of the corpus: disjoint from ``evaluation_text()`` at its default length."""
    return corpus()[-characters:]


@torch.no_grad()
def perplexity(model: Any, input_ids: torch.Tensor, *, window: int = 1024, max_tokens: int | None = None) -> float:
    """exp(mean next-token NLL) over ``input_ids`` (1-D), in non-overlapping windows of ``window`` tokens."""
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1].to(device)
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[None, :-1]).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum")
        total_nll += float(nll)
        count += chunk.numel() - 1
    return math.exp(total_nll / count)


@torch.no_grad()
def cached_perplexity(model: Any, input_ids: torch.Tensor, *, int8_kv: bool, window: int = 1024, chunk: int = 256,
                      max_tokens: int | None = None) -> float:
    """Perplexity through flux's runner and paged KV cache, feeding each window in chunks of ``chunk`` tokens:
    every chunk after the first attends to the cached keys/values of the earlier ones (INT8 when ``int8_kv``), so
    the cache's precision shows in the result."""
    from flux_infer.generation.paged import PagedKVCache, PagedMetadata
    from flux_infer.generation.runner import DecoderRunner
    from flux_infer.plugins.manager import get_plugin_manager

    ids = input_ids.reshape(-1)[:max_tokens]
    runner = DecoderRunner(model, get_plugin_manager().adapter_for(model))
    blocks = -(-(window + 1) // 16)
    cache = PagedKVCache(num_layers=len(runner.layers), num_blocks=blocks, block_size=16,
                         num_kv_heads=runner.num_kv_heads, head_dim=runner.head_dim, dtype=runner.dtype,
                         device=runner.device, int8=int8_kv)
    runner.ensure_rope(window + 1)
    table = list(range(blocks))
    total_nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        sequence = ids[start:start + window + 1].to(runner.device)
        for lo in range(0, sequence.numel() - 1, chunk):
            hi = min(lo + chunk, sequence.numel() - 1)
            meta = PagedMetadata.build(new_tokens=[hi - lo], context_lens=[hi], block_tables=[table], block_size=16,
                                       device=runner.device)
            meta.logits_index = torch.arange(hi - lo, device=runner.device)  # every position, not only the last
            logits = runner.forward(sequence[None, lo:hi], cache, meta)
            total_nll += float(torch.nn.functional.cross_entropy(logits, sequence[lo + 1:hi + 1], reduction="sum"))
            count += hi - lo
    return math.exp(total_nll / count)
