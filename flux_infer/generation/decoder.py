"""``FluxDecoder``: the runner plus its KV cache and the CUDA graphs of its steps, kept between calls.

On CUDA both phases run as captured graphs: the prefill per (batch bucket, prompt-length bucket), and the decode
step per batch bucket. On CUDA the prompt is always left-padded up to its bucket (the padding is masked, so the
result is the same; it also makes the eager and the graphed paths one computation). Buckets: batch 1, 2, 4, 8, ...; prompt lengths in multiples of ``PREFILL_BUCKET``. The cache grows (and
the graphs are recaptured) only when a call needs a larger batch or a longer sequence. On the CPU, or with
graphs off, the same runner runs eagerly.
"""

from __future__ import annotations

import torch

from flux_infer.generation.cache import StaticKVCache, StepMetadata, decode_metadata, prefill_metadata
from flux_infer.generation.runner import DecoderRunner

LENGTH_BUCKET = 256
PREFILL_BUCKET = 64
PREFILL_GRAPH_MAX = 2048  # longer prompts prefill eagerly (one graph per length would hold too much memory)


def batch_bucket(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


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
        initial = [t.clone() for t in (self.meta.positions, self.meta.slots, self.meta.kv_end)]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialization and autotuning stay out of the graph
                runner.forward(self.input_ids, cache, self.meta)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = runner.forward(self.input_ids, cache, self.meta)
            if self.decode:
                self.meta.advance_(1)
        for tensor, value in zip((self.meta.positions, self.meta.slots, self.meta.kv_end), initial, strict=True):
            tensor.copy_(value)

    def load(self, input_ids: torch.Tensor, meta: StepMetadata) -> None:
        """Point the graph at a batch (rows beyond it are padding that attends only to itself)."""
        rows = input_ids.shape[0]
        self.input_ids.zero_()
        self.input_ids[:rows].copy_(input_ids)
        self.meta.positions.zero_()
        self.meta.positions[:rows].copy_(meta.positions)
        self.meta.kv_start.zero_()
        self.meta.kv_start[:rows].copy_(meta.kv_start)
        if self.decode:
            self.meta.slots.copy_(meta.slots)
            self.meta.kv_end.copy_(meta.kv_end.max().expand(self.batch))
            self.meta.kv_end[:rows].copy_(meta.kv_end)

    def run(self, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay (after copying in ``input_ids`` if given); returns the static logits ``[batch, vocab]``."""
        if input_ids is not None:
            self.input_ids[: input_ids.shape[0]].copy_(input_ids)
        self.graph.replay()
        return self.logits


class FluxDecoder:
    def __init__(self, runner: DecoderRunner, *, use_cuda_graphs: bool) -> None:
        self.runner = runner
        self.use_cuda_graphs = use_cuda_graphs and runner.device.type == "cuda"
        self.cache: StaticKVCache | None = None
        self.graphs: dict[tuple[int, int], CapturedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self._decode_graph: CapturedStep | None = None

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

    def release(self) -> None:
        """Free the cache and the graphs (the next call allocates again)."""
        self.graphs.clear()
        self._decode_graph = None
        self.cache = None
        if self.use_cuda_graphs:  # a pool whose graphs were freed cannot take new captures: start a new one
            self._pool = torch.cuda.graph_pool_handle()
