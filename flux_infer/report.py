"""``model.flux_report``: what optimize() applied and skipped, which kernels serve which ops, memory before/after."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from flux_infer.config import InferenceConfig


@dataclasses.dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PluginResult:
    name: str
    version: str
    lossless: bool
    changes: int
    seconds: float
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MemoryUsage:
    """Bytes held by the model's parameters and buffers, and by the CUDA caching allocator (if on CUDA)."""

    model_bytes: int
    cuda_allocated_bytes: int | None

    @classmethod
    def measure(cls, model: torch.nn.Module) -> MemoryUsage:
        seen: set[int] = set()
        total = 0
        for tensor in (*model.parameters(), *model.buffers()):
            if id(tensor) not in seen:  # tied weights count once
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        on_cuda = any(p.is_cuda for p in model.parameters())
        return cls(total, torch.cuda.memory_allocated() if on_cuda else None)


@dataclasses.dataclass(frozen=True)
class OptimizationReport:
    config: InferenceConfig  # resolved
    model_type: str
    adapter: str | None
    applied: tuple[PluginResult, ...]
    skipped: tuple[Skipped, ...]
    kernels: dict[str, str]
    memory_before: MemoryUsage
    memory_after: MemoryUsage
    seconds: float

    @property
    def lossless(self) -> bool:
        return all(r.lossless for r in self.applied)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["config"] = {k: _plain(v) for k, v in data["config"].items()}
        return data

    def __str__(self) -> str:
        level = self.config.optimization_level
        lines = [f"flux_infer {level} on {self.model_type} (adapter: {self.adapter or 'none'}), "
                 f"{'lossless' if self.lossless else 'lossy'}, {self.seconds * 1e3:.0f} ms"]
        lines.append("applied:" if self.applied else "applied: nothing")
        for r in self.applied:
            facts = ", ".join(f"{k}={v}" for k, v in r.details.items())
            lines.append(f"  + {r.name} {r.version} ({r.changes} changes{', ' + facts if facts else ''})")
        if self.skipped:
            lines.append("skipped:")
            lines.extend(f"  - {s.name}: {s.reason}" for s in self.skipped)
        if self.kernels:
            lines.append("kernels: " + ", ".join(f"{op}={impl}" for op, impl in sorted(self.kernels.items())))
        before, after = self.memory_before, self.memory_after
        lines.append(f"model memory: {_mib(before.model_bytes)} -> {_mib(after.model_bytes)}")
        if before.cuda_allocated_bytes is not None and after.cuda_allocated_bytes is not None:
            lines.append(f"CUDA allocated: {_mib(before.cuda_allocated_bytes)} -> {_mib(after.cuda_allocated_bytes)}")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if hasattr(value, "value") else value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)
