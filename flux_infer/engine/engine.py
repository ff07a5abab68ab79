"""Continuous batching: requests join and leave between steps, on one paged KV cache and flux's model runner.

Each ``step()`` schedules (decode tokens of running requests first, then prefill chunks within the token budget),
runs one forward over all scheduled tokens as a single flat batch, samples each sequence whose last token was in
the step, and returns what each request produced. When a running request needs a block and none is free, the
youngest running request is preempted: its blocks are freed and it is recomputed later from its prompt and the
tokens it already produced, so its output does not change. A request that could never fit in the pool finishes at
once with ``finish_reason="kv_cache_capacity"``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from flux_infer.generation.paged import BlockManager, PagedKVCache, PagedMetadata
from flux_infer.generation.paged_graphs import PagedDecodeGraphs
from flux_infer.errors import InvalidConfigError, UnsupportedModelError
from flux_infer.generation.runner import DecoderRunner, runner_support
from flux_infer.generation.sampling import SamplingParams, TokenSelector, argmax_last

DEFAULT_BLOCK_SIZE = 16
CPU_KV_BUDGET = 1 << 30  # bytes of KV cache on the CPU when no budget is given


class IncrementalDetokenizer:
    """Text of a growing token sequence, released in whole characters (no half of a multi-byte UTF-8 sequence)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # the last token ends inside a character: wait for the rest
            return ""
        new, self.text = full[len(self.text):], full
        return new


@dataclasses.dataclass(eq=False)  # compared by identity: requests are looked up every step
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...]
    selector: TokenSelector
    detokenizer: IncrementalDetokenizer | None
    arrival: float
    order: int
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    text: str = ""
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def metrics(self) -> dict[str, Any]:
        end = self.finished_at or time.perf_counter()
        n = len(self.output_ids)
        ttft = None if self.first_token_at is None else (self.first_token_at - self.arrival) * 1e3
        tpot = None if n < 2 or self.first_token_at is None else (end - self.first_token_at) * 1e3 / (n - 1)
        return {"latency_ms": (end - self.arrival) * 1e3, "ttft_ms": ttft, "tpot_ms": tpot,
                "prompt_tokens": len(self.prompt_ids), "completion_tokens": n, "preemptions": self.preemptions}


@dataclasses.dataclass
class KVStats:
    """Block usage: the peak number of allocated blocks, the fraction of their slots holding no token at that
    peak (internal fragmentation), and the largest such fraction seen at any step."""

    peak_blocks: int = 0
    waste_at_peak: float = 0.0
    max_waste: float = 0.0

    def observe(self, blocks: BlockManager, running: dict[str, Request], scheduled: list[tuple[Request, int]]
                ) -> None:
        """Called after a step's blocks are allocated and before its tokens count as computed."""
        allocated = blocks.num_blocks - blocks.num_free
        if allocated == 0:
            return
        used = sum(r.num_computed for r in running.values()) + sum(count for _, count in scheduled)
        waste = 1 - used / (allocated * blocks.block_size)
        self.max_waste = max(self.max_waste, waste)
        if allocated >= self.peak_blocks:
            self.peak_blocks, self.waste_at_peak = allocated, waste


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    metrics: dict[str, Any] | None  # the request's metrics once it finished (``Engine.requests[id].metrics()``
    # gives them at any time)


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 num_blocks: int | None = None, kv_cache_bytes: int | None = None,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 256, int8_kv: bool = False,
                 graph_decode: bool | None = None) -> None:
        """``graph_decode``: run decode-only steps padded to batch buckets on static buffers, captured as CUDA
        graphs on CUDA (default: on for CUDA, off elsewhere; on the CPU it runs the padded steps eagerly)."""
        from flux_infer.plugins.manager import get_plugin_manager

        adapter = get_plugin_manager().adapter_for(model)
        if adapter is None:
            raise UnsupportedModelError(f"no adapter for model_type {model.config.model_type!r}")
        support = runner_support(model, adapter)
        if not support:
            raise UnsupportedModelError(f"the engine cannot run this model: {support.reason}")
        if block_size < 1 or max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise InvalidConfigError("block_size, max_num_batched_tokens and max_num_seqs must be positive")
        self.runner = DecoderRunner(model, adapter)
        self.tokenizer = tokenizer
        runner = self.runner
        per_block = PagedKVCache.bytes_per_block(num_layers=len(runner.layers), block_size=block_size,
                                                 num_kv_heads=runner.num_kv_heads, head_dim=runner.head_dim,
                                                 dtype=runner.dtype, int8=int8_kv)
        if num_blocks is None:
            if kv_cache_bytes is None:
                kv_cache_bytes = (int(torch.cuda.mem_get_info(runner.device)[0] * 0.9)
                                  if runner.device.type == "cuda" else CPU_KV_BUDGET)
            num_blocks = kv_cache_bytes // per_block
        if num_blocks < 1:
            raise InvalidConfigError(f"the KV cache budget holds no block of {per_block} bytes")
        # one block more than the manager hands out: the scratch block that padded decode rows write into
        self.cache = PagedKVCache(num_layers=len(runner.layers), num_blocks=num_blocks + 1, block_size=block_size,
                                  num_kv_heads=runner.num_kv_heads, head_dim=runner.head_dim, dtype=runner.dtype,
                                  device=runner.device, int8=int8_kv)
        self.blocks = BlockManager(num_blocks, block_size)
        # the model's limit ends a sequence with "length"; one the pool cannot hold ends with kv_cache_capacity
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self.max_model_len = min(self.max_positions or num_blocks * block_size, num_blocks * block_size)
        runner.ensure_rope(self.max_model_len)
        if graph_decode is None:
            graph_decode = runner.device.type == "cuda"
        self.decode_graphs = PagedDecodeGraphs(
            runner, self.cache, max_batch=max_num_seqs, max_blocks_per_seq=self.blocks.blocks_for(self.max_model_len),
            scratch_block=num_blocks, capture=runner.device.type == "cuda",
        ) if graph_decode else None
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # by id, in admission order
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._dropped: list[Request] = []
        self.kv_stats = KVStats()

    @torch.no_grad()
    def warmup(self) -> float:
        """Compile the attention kernels and capture the decode graph of every batch bucket now, instead of in
        the first steps that need them (what a server does at start). Returns the seconds it took."""
        start = time.perf_counter()
        scratch = self.blocks.num_blocks  # a prefill chunk and a decode, both inside the scratch block
        meta = PagedMetadata.build(new_tokens=[2, 1], context_lens=[2, 1], block_tables=[[scratch], [scratch]],
                                   block_size=self.blocks.block_size, device=self.runner.device)
        self.runner.forward(torch.zeros(1, 3, dtype=torch.long, device=self.runner.device), self.cache, meta)
        if self.decode_graphs is not None:
            self.decode_graphs.capture_all()
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - start

    # ---- requests ---------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], *, request_id: str | None = None, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                    seed: int | None = None) -> str:
        """Queue a request; returns its id. ``prompt`` is text (needs the tokenizer) or token ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidConfigError("a text prompt needs the engine's tokenizer; pass token ids or tokenizer=")
            prompt_ids = self.tokenizer(prompt)["input_ids"]
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise InvalidConfigError("empty prompt")
        if self.max_positions is not None and len(prompt_ids) >= self.max_positions:
            raise InvalidConfigError(f"the prompt has {len(prompt_ids)} tokens; the model takes at most "
                                     f"{self.max_positions} positions (prompt and output): shorten the prompt")
        if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise InvalidConfigError("need max_new_tokens >= 1, temperature >= 0 and 0 < top_p <= 1")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidConfigError(f"request id {request_id!r} is already in use")
        if stop_token_ids is None:
            eos = getattr(self.runner.model.generation_config, "eos_token_id", None)
            stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        params = SamplingParams(do_sample=temperature > 0, temperature=temperature or 1.0, top_k=top_k,
                                top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        device = self.runner.device
        generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        selector = TokenSelector(params, prompt_ids=torch.tensor([prompt_ids], device=device),
                                 vocab_size=self.runner.vocab_size, eos_ids=None, generator=generator)
        request = Request(
            request_id=request_id, prompt_ids=prompt_ids, params=params, max_new_tokens=max_new_tokens,
            stop_token_ids=frozenset(stop_token_ids), stop=tuple(stop), selector=selector,
            detokenizer=IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None,
            arrival=time.perf_counter(), order=len(self.requests),
        )
        self.requests[request_id] = request
        if self.blocks.blocks_for(len(prompt_ids) + 1) > self.blocks.num_blocks:
            self._finish(request, "kv_cache_capacity")  # could never fit, even alone
        else:
            self.waiting.append(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and return its blocks to the pool."""
        request = self.requests.get(request_id)
        if request is None:
            raise KeyError(f"unknown request id {request_id!r}")
        if not request.finished:
            self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        self.blocks.free(request.request_id)
        if self.running.pop(request.request_id, None) is None and request in self.waiting:
            self.waiting.remove(request)

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request.request_id)
        request.num_computed = 0
        request.preemptions += 1
        del self.running[request.request_id]
        self.waiting.appendleft(request)

    # ---- one step ---------------------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, int]]:
        """(request, tokens to compute this step), decodes first, then prefill chunks within the token budget.
        Requests that can never fit are finished here (kept in ``self._dropped`` to be reported)."""
        scheduled: list[tuple[Request, int]] = []
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        for request in sorted(self.running.values(), key=lambda r: r.order):
            if request.request_id not in self.running or budget == 0:
                continue  # preempted by an older request of this step, or no budget left
            remaining = len(request.prompt_ids) + len(request.output_ids) - request.num_computed
            count = min(remaining, budget)
            while not self.blocks.grow(request.request_id, request.num_computed + count):
                victims = [r for r in self.running.values()
                           if r is not request and r.request_id not in scheduled_ids]
                if not victims:
                    if len(self.running) == 1 and not scheduled:  # alone and still too big for the pool
                        self._finish(request, "kv_cache_capacity")
                        self._dropped.append(request)
                    count = 0
                    break
                self._preempt(max(victims, key=lambda r: r.order))
            if count:
                scheduled.append((request, count))
                scheduled_ids.add(request.request_id)
                budget -= count
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            count = min(len(request.all_ids) - request.num_computed, budget)
            if not self.blocks.grow(request.request_id, request.num_computed + count):
                break  # no preemption to admit new work: wait for blocks to come back
            self.waiting.popleft()
            self.running[request.request_id] = request
            scheduled.append((request, count))
            budget -= count
        return scheduled

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an output for every request that produced a token or finished."""
        self._dropped: list[Request] = []
        scheduled = self._schedule()
        outputs = [RequestOutput(r.request_id, [], "", True, r.finish_reason, r.metrics()) for r in self._dropped]
        if not scheduled:
            return outputs
        logits = self._forward(scheduled)
        self.kv_stats.observe(self.blocks, self.running, scheduled)
        sampled = []  # (row, request): sequences whose last known token was in this step
        for row, (request, count) in enumerate(scheduled):
            request.num_computed += count
            if request.num_computed == len(request.prompt_ids) + len(request.output_ids):
                sampled.append((row, request))
        token_ids = self._sample(logits, sampled)
        now = time.perf_counter()
        for (_, request), token_id in zip(sampled, token_ids, strict=True):
            request.output_ids.append(token_id)
            request.first_token_at = request.first_token_at or now
            new_text = request.detokenizer.add(token_id) if request.detokenizer is not None else ""
            request.text += new_text
            reason = self._stop_reason(request, token_id)
            if reason is not None:
                if any(stop in request.text for stop in request.stop):
                    new_text = self._trim_stop(request, new_text)
                self._finish(request, reason)
            outputs.append(RequestOutput(request.request_id, [token_id], new_text, request.finished,
                                         request.finish_reason, request.metrics() if request.finished else None))
        return outputs

    def _forward(self, scheduled: list[tuple[Request, int]]) -> torch.Tensor:
        """Logits of each scheduled sequence's last token this step (K/V of all its tokens into the cache)."""
        tables = [self.blocks.tables[r.request_id] for r, _ in scheduled]
        context_lens = [r.num_computed + count for r, count in scheduled]
        decode_only = all(count == 1 and r.num_computed == len(r.prompt_ids) + len(r.output_ids) - 1
                          for r, count in scheduled)
        if decode_only and self.decode_graphs is not None:
            return self.decode_graphs.run([r.output_ids[-1] if r.output_ids else r.prompt_ids[-1]
                                           for r, _ in scheduled], context_lens, tables)
        ids: list[int] = []
        for request, count in scheduled:
            start = request.num_computed
            prompt = request.prompt_ids
            ids += prompt[start:start + count] if start + count <= len(prompt) else request.all_ids[start:start + count]
        meta = PagedMetadata.build(new_tokens=[count for _, count in scheduled], context_lens=context_lens,
                                   block_tables=tables, block_size=self.blocks.block_size, device=self.runner.device)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.runner.device)
        return self.runner.forward(input_ids, self.cache, meta)

    @staticmethod
    def _sample(logits: torch.Tensor, sampled: list[tuple[int, Request]]) -> list[int]:
        """Next token of each ``(row, request)``: one argmax for all greedy rows, each other row through its own
        selector (its parameters and generator), and a single read back to the host."""
        tokens = argmax_last(logits)
        for row, request in sampled:
            if not request.selector.plain_greedy:
                token, _ = request.selector(logits[row:row + 1], suppress_eos=False)
                request.selector.observe(token)
                tokens[row] = token[0]
        values = tokens.tolist()
        return [values[row] for row, _ in sampled]

    def _stop_reason(self, request: Request, token_id: int) -> str | None:
        if token_id in request.stop_token_ids:
            return "stop"
        if request.stop and any(s in request.text for s in request.stop):
            return "stop"
        if (len(request.output_ids) >= request.max_new_tokens
                or len(request.prompt_ids) + len(request.output_ids) >= (self.max_positions or self.max_model_len)):
            return "length"
        return None

    @staticmethod
    def _trim_stop(request: Request, new_text: str) -> str:
        """Cut the text before the first stop string (stop strings are not part of the output)."""
        cut = min(request.text.find(s) for s in request.stop if s in request.text)
        already = len(request.text) - len(new_text)
        request.text = request.text[:cut]
        return new_text[: max(0, cut - already)]

    # ---- convenience ------------------------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> dict[str, Request]:
        """Step until every request finished (or ``max_steps``); returns all requests by id."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_unfinished():
                break
            self.step()
        return self.requests
