"""The paged KV cache layout: fixed-size blocks from one preallocated pool, a block table per sequence; and
``PagedDecoder``, which runs ``model.generate``'s prefill/decode steps on it.

Pool tensors are ``[layers, num_blocks * block_size, kv_heads, head_dim]`` (row ``block * block_size + offset``).
A step's tokens from many sequences form one flat row; ``PagedMetadata`` says where each token's K/V goes
(``slot_mapping``) and which cached tokens each sequence attends to, planned once per step for all layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flux_infer import kernels


@dataclasses.dataclass
class PagedMetadata:
    positions: torch.Tensor  # [1, N] rotary position of each token
    slot_mapping: torch.Tensor  # [N] pool row each token's K/V is written to
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32: cached tokens per sequence after this step
    query_start: torch.Tensor  # [S + 1] int32: sequence s's tokens are rows query_start[s]:query_start[s+1]
    logits_index: torch.Tensor  # [S] row of each sequence's last token (the one whose logits are sampled)

    def logit_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[0].index_select(0, self.logits_index)

    @classmethod
    def build(cls, *, new_tokens: Sequence[int], context_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int, device: torch.device) -> PagedMetadata:
        """Metadata for sequences that each add ``new_tokens[s] >= 1`` tokens, ending at ``context_lens[s]``.

        Planned with numpy on the host and sent in two copies (int64 and int32 fields), whatever the batch."""
        sequences = len(new_tokens)
        counts = np.asarray(new_tokens, dtype=np.int64)
        contexts = np.asarray(context_lens, dtype=np.int64)
        starts = np.zeros(sequences + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        tables = padded_tables(block_tables, fill=0)
        width = tables.shape[1]
        owner = np.repeat(np.arange(sequences), counts)  # sequence of each token
        positions = np.arange(starts[-1]) - starts[owner] + (contexts - counts)[owner]
        slots = tables[owner, positions // block_size] * block_size + positions % block_size
        _, (positions_t, slots_t, logits_t) = _packed([positions, slots, starts[1:] - 1], np.int64, device)
        _, (tables_t, contexts_t, starts_t) = _packed([tables.ravel(), contexts, starts], np.int32, device)
        return cls(positions=positions_t[None], slot_mapping=slots_t, block_tables=tables_t.view(sequences, width),
                   context_lens=contexts_t, query_start=starts_t, logits_index=logits_t)


def padded_tables(block_tables: Sequence[Sequence[int]], *, fill: int) -> np.ndarray:
    """Block tables as one int64 array ``[sequences, widest table]``, shorter ones padded with ``fill``."""
    width = max((len(t) for t in block_tables), default=1) or 1
    flat: list[int] = []
    for table in block_tables:
        flat += table
        flat += [fill] * (width - len(table))
    return np.asarray(flat, dtype=np.int64).reshape(len(block_tables), width)


def _packed(arrays: list[np.ndarray], dtype: type, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One host-to-device copy for several small arrays; each view starts at a 16-byte boundary (Triton
    specializes kernels on pointer alignment, so a step-dependent offset would compile new variants mid-run)."""
    per_16 = 16 // np.dtype(dtype).itemsize
    offsets, total = [], 0
    for array in arrays:
        offsets.append(total)
        total += -(-len(array) // per_16) * per_16
    host = np.zeros(max(total, 1), dtype=dtype)
    for offset, array in zip(offsets, arrays, strict=True):
        host[offset:offset + len(array)] = array
    buffer = torch.from_numpy(host).to(device)
    return buffer, [buffer[offset:offset + len(array)] for offset, array in zip(offsets, arrays, strict=True)]


class PagedKVCache:
    """The pool. ``int8=True`` stores keys and values as INT8 with one float32 scale per (token, kv head) —
    about half the bytes of bf16 (a quarter of fp32) — and attention dequantizes them as it reads."""

    def __init__(self, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, int8: bool = False) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        store = torch.int8 if int8 else dtype
        self.k = torch.zeros(shape, dtype=store, device=device)
        self.v = torch.zeros(shape, dtype=store, device=device)
        self.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device) if int8 else None
        self.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=device) if int8 else None
        self.num_blocks, self.block_size, self.int8 = num_blocks, block_size, int8

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, int8: bool = False) -> int:
        per_vector = head_dim + 4 if int8 else head_dim * torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * per_vector

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else 2 * self.k_scale.numel() * 4
        return 2 * self.k.numel() * self.k.element_size() + scales

    def append_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: PagedMetadata) -> None:
        """Rotate q, k ``[1, N, heads, D]`` in place; write k, v at ``meta.slot_mapping``."""
        kernels.rotary_embedding_(q, k, cos, sin, meta.positions)
        scales = (self.k_scale[layer], self.v_scale[layer]) if self.int8 else (None, None)
        kernels.paged_kv_write_(k[0], v[0], self.k[layer], self.v[layer], meta.slot_mapping, *scales)

    def rotary_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, meta: PagedMetadata, *, scale: float, window: int) -> torch.Tensor:
        self.append_rotary(layer, q, k, v, cos, sin, meta)
        return self.attend(layer, q, meta, scale=scale, window=window)

    def attend(self, layer: int, q: torch.Tensor, meta: PagedMetadata, *, scale: float, window: int) -> torch.Tensor:
        scales = (self.k_scale[layer], self.v_scale[layer]) if self.int8 else (None, None)
        out = kernels.paged_attention(q[0], self.k[layer], self.v[layer], meta.block_tables, meta.context_lens,
                                      meta.query_start, self.block_size, scale, window, *scales)
        return out[None]


class BlockManager:
    """Hands out blocks of the pool; a sequence's blocks are returned all at once when it finishes or is preempted."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def missing(self, seq_id: str, tokens: int) -> int:
        """How many more blocks ``seq_id`` needs to hold ``tokens`` tokens."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(seq_id, ())))

    def grow(self, seq_id: str, tokens: int) -> bool:
        """Make room for ``tokens`` tokens of ``seq_id``; False (and nothing taken) if the pool is short."""
        need = self.missing(seq_id, tokens)
        if need > len(self._free):
            return False
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        return True

    def free(self, seq_id: str) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))


@dataclasses.dataclass
class PagedDecodeState:
    """Where a generate call's rows stand: their block tables and cached lengths (advanced by each decode)."""

    tables: list[list[int]]
    lengths: list[int]


class PagedDecoder:
    """The ``FluxDecoder`` interface (``prefill``/``decode``/``release``) on a paged (optionally INT8) cache.

    The pool grows to fit a call (rows x blocks of prompt + new tokens) and is kept for the next one. Each row
    holds only its real tokens: left padding is dropped instead of masked.
    """

    use_cuda_graphs = False

    def __init__(self, runner: Any, *, block_size: int = 16, int8: bool = False) -> None:
        self.runner, self.block_size, self.int8 = runner, block_size, int8
        self.cache: PagedKVCache | None = None
        self.blocks: BlockManager | None = None

    def _reserve(self, blocks_needed: int, max_len: int) -> None:
        if self.cache is None or self.cache.num_blocks < blocks_needed:
            runner = self.runner
            self.cache = PagedKVCache(num_layers=len(runner.layers), num_blocks=blocks_needed,
                                      block_size=self.block_size, num_kv_heads=runner.num_kv_heads,
                                      head_dim=runner.head_dim, dtype=runner.dtype, device=runner.device,
                                      int8=self.int8)
            self.blocks = BlockManager(blocks_needed, self.block_size)
        for seq in list(self.blocks.tables):
            self.blocks.free(seq)
        self.runner.ensure_rope(max_len)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
                ) -> tuple[torch.Tensor, PagedDecodeState]:
        lengths = attention_mask.long().sum(-1).tolist()
        width = input_ids.shape[1]
        per_row = [-(-(n + max_new_tokens) // self.block_size) for n in lengths]
        self._reserve(sum(per_row), max(lengths) + max_new_tokens)
        for row, n in enumerate(lengths):
            self.blocks.grow(f"row-{row}", n + max_new_tokens)
        tables = [self.blocks.tables[f"row-{row}"] for row in range(len(lengths))]
        tokens = torch.cat([input_ids[row, width - n:] for row, n in enumerate(lengths)])[None]
        meta = PagedMetadata.build(new_tokens=lengths, context_lens=lengths, block_tables=tables,
                                   block_size=self.block_size, device=self.runner.device)
        return self.runner.forward(tokens, self.cache, meta), PagedDecodeState(tables, list(lengths))

    def decode(self, input_ids: torch.Tensor, state: PagedDecodeState) -> torch.Tensor:
        state.lengths = [n + 1 for n in state.lengths]
        meta = PagedMetadata.build(new_tokens=[1] * len(state.lengths), context_lens=state.lengths,
                                   block_tables=state.tables, block_size=self.block_size, device=self.runner.device)
        return self.runner.forward(input_ids.reshape(1, -1), self.cache, meta)

    def release(self) -> None:
        self.cache = self.blocks = None
