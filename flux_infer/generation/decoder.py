"""``FluxDecoder``: the runner plus its KV cache and the CUDA graphs of the decode step, kept between calls.

Graphs are captured per batch-size bucket (1, 2, 4, 8, ...) for the cache they were captured with; the cache
grows (and the graphs are recaptured) only when a call needs a larger batch or a longer sequence.
"""

from __future__ import annotations

import torch

from flux_infer.generation.cache import StaticKVCache, StepMetadata
from flux_infer.generation.runner import DecoderRunner

LENGTH_BUCKET = 256


def batch_bucket(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


def length_bucket(length: int) -> int:
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class DecodeGraph:
    """The decode step for ``batch`` rows captured once; each replay also advances its metadata by one token."""

    def __init__(self, runner: DecoderRunner, cache: StaticKVCache, batch: int, pool: object) -> None:
        device = runner.device
        last = cache.max_len - 1  # warm-up writes land in the last slot, which is rewritten before it is read
        self.batch = batch
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.meta = StepMetadata(
            positions=torch.zeros(batch, 1, dtype=torch.long, device=device),
            slots=torch.tensor([last], device=device),
            kv_start=torch.zeros(batch, dtype=torch.int32, device=device),
            kv_end=torch.full((batch,), cache.max_len, dtype=torch.int32, device=device),
            kv_len=None,
        )
        initial = (self.meta.positions.clone(), self.meta.slots.clone(), self.meta.kv_end.clone())
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lazy initialization and autotuning stay out of the graph
                runner.forward(self.input_ids, cache, self.meta)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = runner.forward(self.input_ids, cache, self.meta)
            self.meta.advance_(1)
        for tensor, value in zip((self.meta.positions, self.meta.slots, self.meta.kv_end), initial, strict=True):
            tensor.copy_(value)

    def load(self, input_ids: torch.Tensor, meta: StepMetadata) -> None:
        """Point the graph at a batch's first decode step (rows beyond the batch are padding)."""
        rows = input_ids.shape[0]
        self.input_ids.zero_()
        self.input_ids[:rows].copy_(input_ids)
        self.meta.positions.zero_()
        self.meta.positions[:rows].copy_(meta.positions)
        self.meta.slots.copy_(meta.slots)
        self.meta.kv_start.zero_()
        self.meta.kv_start[:rows].copy_(meta.kv_start)
        self.meta.kv_end.copy_(meta.kv_end.max().expand(self.batch))
        self.meta.kv_end[:rows].copy_(meta.kv_end)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the captured step on ``input_ids`` ``[rows, 1]``; returns logits ``[batch, vocab]`` (static)."""
        self.input_ids[: input_ids.shape[0]].copy_(input_ids)
        self.graph.replay()
        return self.logits


class FluxDecoder:
    def __init__(self, runner: DecoderRunner, *, use_cuda_graphs: bool) -> None:
        self.runner = runner
        self.use_cuda_graphs = use_cuda_graphs and runner.device.type == "cuda"
        self.cache: StaticKVCache | None = None
        self.graphs: dict[int, DecodeGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None

    def reserve(self, batch: int, max_len: int) -> StaticKVCache:
        """A cache with room for ``batch`` rows of ``max_len`` tokens (reused when the current one fits)."""
        runner = self.runner
        rows = batch_bucket(batch) if self.use_cuda_graphs else batch
        if self.cache is None or not self.cache.fits(rows, max_len, runner.dtype, runner.device):
            if self.cache is not None:
                rows, max_len = max(rows, self.cache.batch), max(max_len, self.cache.max_len)
            self.release()
            self.cache = runner.new_cache(rows, length_bucket(max_len))
        return self.cache

    def graph(self, batch: int) -> DecodeGraph | None:
        if not self.use_cuda_graphs or self.cache is None:
            return None
        bucket = batch_bucket(batch)
        if bucket not in self.graphs:
            self.graphs[bucket] = DecodeGraph(self.runner, self.cache, bucket, self._pool)
        return self.graphs[bucket]

    def release(self) -> None:
        """Free the cache and the graphs (the next call allocates again)."""
        self.graphs.clear()
        self.cache = None
        if self.use_cuda_graphs:  # a pool whose graphs were freed cannot take new captures: start a new one
            self._pool = torch.cuda.graph_pool_handle()
