"""``layer_timer``: wall time of each decoder layer's forward, collected in ``model.layer_timings``."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

import flux_infer


class LayerTimings:
    """Seconds spent in each decoder layer (synchronizing CUDA around each layer when on a GPU)."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)

    def summary(self) -> str:
        total = sum(self.seconds.values())
        return f"{len(self.seconds)} layers, {sum(self.calls.values())} calls, {total * 1e3:.1f} ms"


class LayerTimerPlugin(flux_infer.Plugin):
    name = "layer_timer"
    description = "per-decoder-layer forward timings in model.layer_timings (example third-party plugin)"
    provides = frozenset({"profiling:layers"})
    after = ("fused_kernels",)  # time the modules that will actually run
    levels = frozenset()  # no level enables it: ask for it with InferenceConfig(plugins=["layer_timer"])

    def supports(self, model: torch.nn.Module, ctx: flux_infer.PlanContext) -> flux_infer.Support:
        if ctx.adapter is None:
            return flux_infer.Support.no("no adapter to find the decoder layers")
        return flux_infer.Support.yes()

    def apply(self, model: torch.nn.Module, ctx: flux_infer.ApplyContext) -> None:
        timings = LayerTimings()
        started: dict[int, float] = {}
        for index, layer in enumerate(ctx.adapter.get_layers(model)):
            def pre(module, args, index=index):
                if torch.cuda.is_available() and ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                started[index] = time.perf_counter()

            def post(module, args, output, index=index):
                if torch.cuda.is_available() and ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                timings.seconds[index] += time.perf_counter() - started.pop(index)
                timings.calls[index] += 1

            ctx.patch.register_forward_hook(layer, pre, pre=True)
            ctx.patch.register_forward_hook(layer, post)
        ctx.patch.setattr(model, "layer_timings", timings)
        ctx.detail("layers", len(ctx.adapter.get_layers(model)))


@flux_infer.hookimpl
def flux_infer_register_plugins():
    return [LayerTimerPlugin()]
