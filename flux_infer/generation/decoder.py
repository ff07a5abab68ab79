"""``FluxDecoder``: the runner plus its KV cache and the CUDA graphs of its steps, kept between calls.

On CUDA both phases run as captured graphs: the prefill per (batch bucket, prompt-length bucket), and the decode
step per batch bucket. Plain greedy decoding keeps the whole step on the device (``greedy``): the argmax, the
finished flags and the next step's input are part of the captured graph, which holds ``GREEDY_GRAPH_STEPS``
steps, so the host launches one graph per that many tokens and no small kernels in between. On CUDA the prompt
is always left-padded up to its bucket (the padding is masked, so the result is the same; it also makes the
eager and the graphed paths one computation). Buckets: batch 1, 2, 4, 8, ...; prompt lengths in multiples of
``PREFILL_BUCKET``. The cache grows (and the graphs are recaptured) only when a call needs a larger batch or a
longer sequence. On the CPU, or with graphs off, the same runner runs eagerly.
"""

from __future__ import annotations

import dataclasses

import torch

from flux_infer.generation.cache import StaticKVCache, StepMetadata, decode_metadata, prefill_metadata
from flux_infer.generation.runner import DecoderRunner
from flux_infer.generation.sampling import argmax_last

LENGTH_BUCKET = 256
PREFILL_BUCKET = 64
PREFILL_GRAPH_MAX = 2048  # longer prompts prefill eagerly (one graph per length would hold too much memory)
GREEDY_GRAPH_STEPS = 8  # greedy decode steps per captured graph (the rest of a call's steps: one-step graphs)


def batch_bucket(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def load_metadata(static: StepMetadata, meta: StepMetadata, rows: int, *, decode: bool) -> None:
    """Copy a batch of ``rows`` rows' ``meta`` into a graph's ``static`` metadata (more rows: padding at position 0
    that attends only to itself). A prefill graph keeps its own slots and lengths; a decode graph takes the slot
    and the valid lengths, padding rows the longest."""
    static.positions.zero_()
    static.positions[:rows].copy_(meta.positions)
    static.kv_start.zero_()
    static.kv_start[:rows].copy_(meta.kv_start)
    if decode:
        static.slots.copy_(meta.slots)
        static.kv_end.copy_(meta.kv_end.max().expand_as(static.kv_end))
        static.kv_end[:rows].copy_(meta.kv_end)


class CapturedStep:
    """A forward of ``batch`` rows by ``q_len`` tokens, captured once.

    A decode step (``q_len == 1``) attends over the whole cache (lengths live on the device) and advances its own
    metadata inside the graph, so each replay moves one token on. A prefill step writes slots ``[0, q_len)``.
    """

    def __init__(self, runner: DecoderRunner, cache: StaticKVCache, batch: int, q_len: int, pool: object) -> None:
        device = runner.device
        self.batch, self.q_len = batch, q_len
        self.decode = q_len == 1
        slots = cache.max_len if self.decode else q_len
        self.input_ids = torch.zeros(batch, q_len, dtype=torch.long, device=device)
        self.meta = StepMetadata(
            positions=torch.zeros(batch, q_len, dtype=torch.long, device=device),
            # a decode warm-up writes the last slot, which is rewritten before anything reads it
            slots=torch.tensor([cache.max_len - 1], device=device) if self.decode else torch.arange(q_len,
                                                                                                  device=device),
            kv_start=torch.zeros(batch, dtype=torch.int32, device=device),
            kv_end=torch.full((batch,), slots, dtype=torch.int32, device=device),
            kv_len=None if self.decode else q_len,
        )
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialization and autotuning stay out of the graph
                runner.forward(self.input_ids, cache, self.meta)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = runner.forward(self.input_ids, cache, self.meta)
            if self.decode:  # recorded, not run: the metadata moves on at each replay
                self.meta.advance_(1)

    def load(self, input_ids: torch.Tensor, meta: StepMetadata) -> None:
        """Point the graph at a batch (rows beyond it are padding that attends only to itself)."""
        rows = input_ids.shape[0]
        self.input_ids.zero_()
        self.input_ids[:rows].copy_(input_ids)
        load_metadata(self.meta, meta, rows, decode=self.decode)

    def run(self, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay (after copying in ``input_ids`` if given); returns the static logits ``[batch, vocab]``."""
        if input_ids is not None:
            self.input_ids[: input_ids.shape[0]].copy_(input_ids)
        self.graph.replay()
        return self.logits


@dataclasses.dataclass
class GreedyState:
    """A greedy decode in progress, on the device: ``tokens`` ``[rows, 1]`` the next step's input, ``out``
    ``[rows, capacity]`` the token generated at position p in column p, ``step`` (a 0-d tensor) the position the
    next step writes, and the decode loop's ``unfinished`` / ``finish_step`` ``[rows]``."""

    tokens: torch.Tensor
    out: torch.Tensor
    step: torch.Tensor
    unfinished: torch.Tensor
    finish_step: torch.Tensor

    @classmethod
    def empty(cls, rows: int, capacity: int, device: torch.device) -> GreedyState:
        long = dict(dtype=torch.long, device=device)
        return cls(tokens=torch.zeros(rows, 1, **long), out=torch.zeros(rows, capacity, **long),
                   step=torch.zeros((), **long), unfinished=torch.zeros(rows, dtype=torch.bool, device=device),
                   finish_step=torch.zeros(rows, **long))

    def load(self, tokens: torch.Tensor, unfinished: torch.Tensor, finish_step: torch.Tensor) -> None:
        """Start after the first generated token (position 0): ``tokens`` ``[B]``; rows beyond B are padding."""
        rows = tokens.shape[0]
        self.tokens.zero_()
        self.tokens[:rows, 0].copy_(tokens)
        self.step.fill_(1)
        self.unfinished.zero_()
        self.unfinished[:rows].copy_(unfinished)
        self.finish_step.copy_(finish_step.max().expand_as(self.finish_step))
        self.finish_step[:rows].copy_(finish_step)


def greedy_step(runner: DecoderRunner, cache: StaticKVCache, meta: StepMetadata, state: GreedyState,
                eos_ids: torch.Tensor | None, pad_id: int) -> None:
    """One decode step with greedy selection, in place and without host synchronization: what the decode loop
    does per step (finished rows emit ``pad_id``; a row that emits an EOS id finishes at that position)."""
    logits = runner.forward(state.tokens, cache, meta)
    meta.advance_(1)
    tokens = torch.where(state.unfinished, argmax_last(logits), pad_id)
    if eos_ids is not None:
        newly = state.unfinished & torch.isin(tokens, eos_ids)
        state.finish_step.copy_(torch.where(newly, state.step, state.finish_step))
        state.unfinished.logical_and_(~newly)
    state.out.index_copy_(1, state.step.view(1), tokens[:, None])
    state.tokens.copy_(tokens[:, None])
    state.step.add_(1)


class GreedyDecode:
    """The rest of a greedy decode after its first token, stepped by ``advance``; ``state`` holds the results.

    With CUDA graphs the steps replay a graph of ``GREEDY_GRAPH_STEPS`` steps (or of one, near the end), captured
    once per batch bucket, EOS ids and pad id over one static state; otherwise each ``advance`` runs one step
    eagerly on the call's own metadata."""

    def __init__(self, runner: DecoderRunner, cache: StaticKVCache, batch: int, eos_ids: torch.Tensor | None,
                 pad_id: int, pool: object | None) -> None:
        self.runner, self.cache, self.eos_ids, self.pad_id = runner, cache, eos_ids, pad_id
        device = runner.device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.state = GreedyState.empty(batch, cache.max_len, device)
        self.meta: StepMetadata | None = None
        if pool is None:
            return
        # capture metadata: the last GREEDY_GRAPH_STEPS slots (rewritten before any step reads them)
        first = cache.max_len - GREEDY_GRAPH_STEPS
        self.meta = StepMetadata(positions=torch.zeros(batch, 1, dtype=torch.long, device=device),
                                 slots=torch.tensor([first], device=device),
                                 kv_start=torch.zeros(batch, dtype=torch.int32, device=device),
                                 kv_end=torch.full((batch,), first + 1, dtype=torch.int32, device=device),
                                 kv_len=None)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialization and autotuning stay out of the graphs
                self._steps(1)
        torch.cuda.current_stream(device).wait_stream(stream)
        for steps in (GREEDY_GRAPH_STEPS, 1):  # (capturing runs nothing; load() sets the state before a replay)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._steps(steps)
            self.graphs[steps] = graph

    def _steps(self, n: int) -> None:
        for _ in range(n):
            greedy_step(self.runner, self.cache, self.meta, self.state, self.eos_ids, self.pad_id)

    def load(self, tokens: torch.Tensor, unfinished: torch.Tensor, finish_step: torch.Tensor,
             meta: StepMetadata) -> None:
        """Start from the first generated token ``tokens`` ``[B]`` and the first decode step's ``meta``."""
        self.state.load(tokens, unfinished, finish_step)
        if self.graphs:
            load_metadata(self.meta, meta, tokens.shape[0], decode=True)
        else:
            self.meta = meta

    def advance(self, limit: int) -> int:
        """Run up to ``limit`` (>= 1) more steps; returns how many ran."""
        if not self.graphs:
            self._steps(1)
            return 1
        steps = GREEDY_GRAPH_STEPS if limit >= GREEDY_GRAPH_STEPS else 1
        self.graphs[steps].replay()
        return steps


class FluxDecoder:
    def __init__(self, runner: DecoderRunner, *, use_cuda_graphs: bool) -> None:
        self.runner = runner
        self.use_cuda_graphs = use_cuda_graphs and runner.device.type == "cuda"
        self.cache: StaticKVCache | None = None
        self.graphs: dict[tuple[int, int], CapturedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self._decode_graph: CapturedStep | None = None
        self._greedy: dict[tuple[int, tuple[int, ...], int], GreedyDecode] = {}

    def reserve(self, batch: int, max_len: int) -> StaticKVCache:
        """A cache with room for ``batch`` rows of ``max_len`` tokens (reused when the current one fits)."""
        runner = self.runner
        rows = batch_bucket(batch) if self.use_cuda_graphs else batch
        if self.cache is None or not self.cache.fits(rows, max_len, runner.dtype, runner.device):
            if self.cache is not None:
                rows, max_len = max(rows, self.cache.batch), max(max_len, self.cache.max_len)
            self.release()
            self.cache = runner.new_cache(rows, round_up(max_len, LENGTH_BUCKET))
        return self.cache

    def _graph(self, batch: int, q_len: int) -> CapturedStep:
        key = (batch_bucket(batch), q_len)
        if key not in self.graphs:
            self.graphs[key] = CapturedStep(self.runner, self.cache, key[0], q_len, self._pool)
        return self.graphs[key]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
                ) -> tuple[torch.Tensor, StepMetadata]:
        """Run the prompt; returns each row's next-token logits and the metadata of the first decode step."""
        batch, length = input_ids.shape
        graphed = self.use_cuda_graphs and length <= PREFILL_GRAPH_MAX
        if self.runner.device.type == "cuda":  # left-pad to the bucket: masked slots change nothing
            pad = round_up(length, PREFILL_BUCKET) - length
            input_ids = torch.nn.functional.pad(input_ids, (pad, 0))
            attention_mask = torch.nn.functional.pad(attention_mask, (pad, 0))
        cache = self.reserve(batch, input_ids.shape[1] + max_new_tokens)
        meta = prefill_metadata(attention_mask)
        if graphed:
            step = self._graph(batch, input_ids.shape[1])
            step.load(input_ids, meta)
            logits = step.run()[:batch]
        else:
            logits = self.runner.forward(input_ids, cache, meta)
        self._decode_graph = None
        return logits, decode_metadata(meta)

    def decode(self, input_ids: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """One decode step for ``input_ids`` ``[B, 1]``; advances ``meta`` (eager) or the graph's own copy."""
        batch = input_ids.shape[0]
        if not self.use_cuda_graphs:
            logits = self.runner.forward(input_ids, self.cache, meta)
            meta.advance_(1)
            return logits
        if self._decode_graph is None:  # first step after a prefill
            self._decode_graph = self._graph(batch, 1)
            self._decode_graph.load(input_ids, meta)
        return self._decode_graph.run(input_ids)[:batch]

    def greedy(self, tokens: torch.Tensor, unfinished: torch.Tensor, finish_step: torch.Tensor, meta: StepMetadata,
               eos_ids: torch.Tensor | None, pad_id: int) -> GreedyDecode:
        """The greedy decode after a prefill, from its first generated token ``tokens`` ``[B]`` (see
        ``GreedyDecode``); ``meta`` is the first decode step's metadata, as ``prefill`` returned it."""
        batch = tokens.shape[0]
        if self.use_cuda_graphs:
            key = (batch_bucket(batch), () if eos_ids is None else tuple(eos_ids.tolist()), pad_id)
            if key not in self._greedy:
                self._greedy[key] = GreedyDecode(self.runner, self.cache, key[0], eos_ids, pad_id, self._pool)
            decode = self._greedy[key]
        else:
            decode = GreedyDecode(self.runner, self.cache, batch, eos_ids, pad_id, None)
        decode.load(tokens, unfinished, finish_step, meta)
        return decode

    def release(self) -> None:
        """Free the cache and the graphs (the next call allocates again)."""
        self.graphs.clear()
        self._greedy.clear()
        self._decode_graph = None
        self.cache = None
        if self.use_cuda_graphs:  # a pool whose graphs were freed cannot take new captures: start a new one
            self._pool = torch.cuda.graph_pool_handle()
