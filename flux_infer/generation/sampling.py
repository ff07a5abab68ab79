"""Next-token selection on the device, with transformers' processing order and arithmetic.

Order (as transformers applies them): repetition penalty, min-new-tokens EOS suppression, then for sampling
temperature, top-k, top-p, min-p. Sampling draws with the exponential-race trick (``argmax(p / E)``, E ~ Exp(1)),
which needs no host synchronization and is reproducible from a ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses

import torch

_NEG_INF = float("-inf")
_ARGMAX_CHUNKS = 256


def argmax_last(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=-1)`` (first maximum on ties), in two passes over a large vocabulary: the maximum of each
    of up to 256 chunks, then the best chunk. PyTorch's single-pass argmax reduces a row in one block: 27 us for a
    128K vocabulary on an H100, about 1% of a batch-1 decode step; 64 chunks 16.2 us, 256 chunks 11.9 us
    (benchmarks/results/2026-11-27-h100-argmax-chunks.txt)."""
    vocab = scores.shape[-1]
    chunks = _ARGMAX_CHUNKS
    while chunks > 1 and vocab % chunks:
        chunks //= 2
    if chunks < 8 or vocab < 16384:
        return scores.argmax(dim=-1)
    values, index = scores.unflatten(-1, (chunks, vocab // chunks)).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)  # the first chunk holding the maximum
    return (best * (vocab // chunks) + index.gather(-1, best)).squeeze(-1)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


class TokenSelector:
    """Turns a step's float32 logits ``[B, vocab]`` into next tokens ``[B]`` and the processed scores."""

    def __init__(self, params: SamplingParams, *, prompt_ids: torch.Tensor, vocab_size: int,
                 eos_ids: torch.Tensor | None, generator: torch.Generator | None) -> None:
        self.params = params
        self.eos_ids = eos_ids
        self.generator = generator
        self.seen: torch.Tensor | None = None
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            self.seen = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.bool, device=prompt_ids.device)
            self.seen.scatter_(1, prompt_ids, True)

    @property
    def plain_greedy(self) -> bool:
        """Whether the next token is the argmax of the raw logits (no sampling, no penalty)."""
        return not self.params.do_sample and self.seen is None

    def __call__(self, logits: torch.Tensor, *, suppress_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        scores = logits
        if self.seen is not None:
            penalty = p.repetition_penalty
            scores = torch.where(self.seen[:, : scores.shape[-1]],
                                 torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        if suppress_eos and self.eos_ids is not None:
            scores = scores.index_fill(-1, self.eos_ids, _NEG_INF)
        if not p.do_sample:
            return argmax_last(scores), scores
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k:
            k = min(p.top_k, scores.shape[-1])
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], _NEG_INF)
        if p.top_p is not None and p.top_p < 1.0:
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - p.top_p)
            remove[..., -1:] = False
            scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), _NEG_INF)
        if p.min_p is not None:
            probs = torch.softmax(scores, dim=-1)
            remove = probs < p.min_p * probs.amax(dim=-1, keepdim=True)
            remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
            scores = scores.masked_fill(remove, _NEG_INF)
        probs = torch.softmax(scores, dim=-1)
        race = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return (probs / race).argmax(dim=-1), scores

    def observe(self, tokens: torch.Tensor) -> None:
        """Record the tokens just emitted (for the repetition penalty)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
