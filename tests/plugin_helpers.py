"""Real plugins for tests of the planner and the transaction, registered through the public hook."""

from __future__ import annotations

import torch

import flux_infer


def make_plugin(name: str, *, apply=None, supports=None, **metadata) -> flux_infer.Plugin:
    """A Plugin subclass with the given metadata; ``apply(model, ctx)`` defaults to recording its own name."""
    metadata.setdefault("levels", frozenset())
    for key in ("provides", "requires", "conflicts"):
        metadata[key] = frozenset(metadata.get(key, ()))

    def default_apply(self, model, ctx):
        order = getattr(model, "applied_order", [])
        ctx.patch.setattr(model, "applied_order", [*order, name])

    namespace = {"name": name, "apply": apply or default_apply, **metadata}
    if supports is not None:
        namespace["supports"] = supports
    return type(f"Plugin_{name}", (flux_infer.Plugin,), namespace)()


class Provider:
    """A pluggy plugin object, like the module an entry point names."""

    def __init__(self, *plugins: flux_infer.Plugin) -> None:
        self.plugins = plugins

    @flux_infer.hookimpl
    def flux_infer_register_plugins(self):
        return list(self.plugins)


def forward_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
