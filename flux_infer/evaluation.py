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
