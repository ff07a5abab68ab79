"""Decode steps on the paged cache with fixed shapes: ``PagedDecodeGraphs``.

A decode step (one new token for each of ``n`` sequences) is padded to a batch bucket and run on static buffers
that hold its token ids, positions, slots, block tables and lengths. On CUDA each bucket's forward is captured
once as a CUDA graph and replayed, so a step costs a few small copies and one launch instead of hundreds of
kernel launches from Python; elsewhere the padded step runs eagerly (the same computation, which the CPU tests
check against unpadded steps). Padding rows write their K/V into a scratch block that no sequence owns and attend
to that one slot, so they cannot touch real sequences.

The block-table buffer is as wide as the longest sequence the engine allows; the attention kernels read only each
sequence's first ``context_len`` positions, so columns past a table's end are never looked at.
"""

from __future__ import annotations

import numpy as np
import torch

from flux_infer.generation.paged import PagedKVCache, PagedMetadata, padded_tables

SMALL_BUCKETS = (1, 2, 4, 8, 16)
BUCKET_STEP = 16  # above 16 sequences, batches are padded to a multiple of 16


def decode_bucket(sequences: int) -> int:
    for bucket in SMALL_BUCKETS:
        if sequences <= bucket:
            return bucket
    return -(-sequences // BUCKET_STEP) * BUCKET_STEP


class PagedDecodeGraphs:
    def __init__(self, runner: object, cache: PagedKVCache, *, max_batch: int, max_blocks_per_seq: int,
                 scratch_block: int, capture: bool) -> None:
        self.runner, self.cache = runner, cache
        self.block_size = cache.block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * cache.block_size
        self.capture = capture
        rows, device = decode_bucket(max_batch), runner.device
        self.max_batch = rows
        self.longs = torch.zeros(3, rows, dtype=torch.long, device=device)  # token ids, positions, slots
        self.tables = torch.full((rows, max(1, max_blocks_per_seq)), scratch_block, dtype=torch.int32,
                                 device=device)
        self.lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.query_start = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.logits_index = torch.arange(rows, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def _meta(self, rows: int) -> PagedMetadata:
        return PagedMetadata(positions=self.longs[1, :rows][None], slot_mapping=self.longs[2, :rows],
                             block_tables=self.tables[:rows], context_lens=self.lens[:rows],
                             query_start=self.query_start[: rows + 1], logits_index=self.logits_index[:rows])

    def _pad(self, rows: int) -> None:
        """Rows ``[0, rows)`` become padding (scratch slot, length 1)."""
        self.longs[:, :rows].zero_()
        self.longs[2, :rows] = self.scratch_slot
        self.tables[:rows, 0] = self.scratch_block
        self.lens[:rows] = 1

    def _load(self, rows: int, token_ids: list[int], context_lens: list[int], tables: list[list[int]]) -> None:
        n, bs = len(token_ids), self.block_size
        real = padded_tables(tables, fill=self.scratch_block)
        width = real.shape[1]
        host_tables = np.full((rows, width), self.scratch_block, dtype=np.int32)
        host_tables[:n] = real
        positions = np.asarray(context_lens, dtype=np.int64) - 1
        host_longs = np.zeros((3, rows), dtype=np.int64)
        host_longs[0, :n] = token_ids
        host_longs[1, :n] = positions
        host_longs[2, :n] = real[np.arange(n), positions // bs] * bs + positions % bs
        host_longs[2, n:] = self.scratch_slot
        host_lens = np.ones(rows, dtype=np.int32)
        host_lens[:n] = context_lens
        self.longs[:, :rows].copy_(torch.from_numpy(host_longs))
        self.tables[:rows, :width].copy_(torch.from_numpy(host_tables))
        self.lens[:rows].copy_(torch.from_numpy(host_lens))

    def _capture(self, rows: int) -> None:
        self._pad(rows)  # the warm-up and the capture run write K/V: only into the scratch block
        ids, meta = self.longs[0, :rows][None], self._meta(rows)
        device = self.runner.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazy initialization and kernel compilation stay out of the graph
                self.runner.forward(ids, self.cache, meta)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.runner.forward(ids, self.cache, meta)
        self.graphs[rows] = (graph, logits)

    def capture_all(self) -> None:
        """Capture every bucket up to ``max_batch`` now (largest first: the others reuse its memory pool)."""
        if not self.capture:
            return
        buckets = sorted({decode_bucket(n) for n in range(1, self.max_batch + 1)}, reverse=True)
        for rows in buckets:
            if rows not in self.graphs:
                self._capture(rows)

    def run(self, token_ids: list[int], context_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits ``[n, vocab]`` of one decode step: sequence ``i`` adds ``token_ids[i]`` at position
        ``context_lens[i] - 1`` (its K/V go to its block table). The result is valid until the next call."""
        n = len(token_ids)
        rows = decode_bucket(n)
        if rows > self.max_batch:
            raise ValueError(f"{n} sequences exceed the {self.max_batch} the decode buffers were sized for")
        if self.capture and rows not in self.graphs:
            self._capture(rows)
        self._load(rows, token_ids, context_lens, tables)
        if self.capture:
            graph, logits = self.graphs[rows]
            graph.replay()
        else:
            logits = self.runner.forward(self.longs[0, :rows][None], self.cache, self._meta(rows))
        return logits[:n]
