"""Continuous batching over the paged KV cache: ``Engine`` (requests, scheduling, preemption, abort) and the
paged layout (``PagedKVCache``, ``BlockManager``, ``PagedMetadata``)."""

from flux_infer.engine.engine import Engine, IncrementalDetokenizer, Request, RequestOutput
from flux_infer.generation.paged import BlockManager, PagedKVCache, PagedMetadata

__all__ = ["BlockManager", "Engine", "IncrementalDetokenizer", "PagedKVCache", "PagedMetadata", "Request",
           "RequestOutput"]
