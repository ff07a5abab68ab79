"""``Plugin``: the base class of every optimization, built-in or third-party.

Metadata are class attributes (so ``flux-infer plugins`` and the level table can read them without a model);
behaviour is two methods: ``supports(model, ctx)`` answers yes or a reason, ``apply(model, ctx)`` patches the
model only through ``ctx.patch`` (the recorder), which makes it transactional and revertible.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from flux_infer.config import InferenceConfig, OptimizationLevel
from flux_infer.support import Support

if TYPE_CHECKING:
    from flux_infer.adapters.base import ModelAdapter
    from flux_infer.patching import PatchRecorder

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class PlanContext:
    """What ``supports`` may look at: the resolved config and the model's adapter (None if it has none)."""

    config: InferenceConfig
    adapter: ModelAdapter | None
    device: torch.device
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class ApplyContext(PlanContext):
    """What ``apply`` gets: ``patch`` records every change; ``use_kernel`` and ``detail`` feed the report."""

    patch: PatchRecorder
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)
    # one dict shared by every plugin of an optimize() call: how plugins configure each other (e.g. the KV cache
    # layout the decode loop builds), keys documented by the plugin that writes them
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def use_kernel(self, op: str, implementation: str) -> None:
        """Tell the report which implementation ("cuda", "triton", "reference", ...) serves ``op``."""
        self.kernels[op] = implementation

    def detail(self, key: str, value: Any) -> None:
        """Add a fact to this plugin's entry in the report (e.g. ``norms_replaced=61``)."""
        self.details[key] = value


class Plugin:
    """Subclass, fill in the metadata, implement ``apply`` (and ``supports`` if not every model works).

    - ``provides``/``requires``: capability names (``"attention"``, ``"kv_cache"``, ``"weights:int8"``). Two
      selected plugins providing the same capability conflict; a requirement pulls in a plugin providing it.
    - ``conflicts``: plugin names or capabilities this plugin cannot be combined with.
    - ``after``/``before``: plugin names or capabilities to be applied before/after this one, when selected.
    - ``config_field``: the ``InferenceConfig`` switch that enables it (built-ins); third-party plugins
      instead list the ``levels`` that enable them, or are enabled by name: ``InferenceConfig(plugins=[...])``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str | None] = None  # None: the version of the package that registered the plugin
    provides: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    conflicts: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    levels: ClassVar[frozenset[OptimizationLevel]] = frozenset()
    config_field: ClassVar[str | None] = None
    lossless: ClassVar[bool] = True
    needs_adapter: ClassVar[bool] = True  # skipped (with a reason) on models no adapter describes

    def enabled(self, config: InferenceConfig) -> bool:
        """Whether ``config`` (resolved) switches this plugin on."""
        if self.config_field is not None:
            return getattr(config, self.config_field) not in (None, False)
        return config.optimization_level in self.levels

    def explicitly_requested(self, config: InferenceConfig) -> bool:
        """Whether the user asked for this plugin rather than getting it from the level preset."""
        return self.name in config.plugins or (
            self.config_field is not None and config.explicit(self.config_field) and self.enabled(config)
        )

    def enabled_levels(self) -> tuple[OptimizationLevel, ...]:
        """The levels whose default config enables this plugin (for docs and ``flux-infer plugins``)."""
        return tuple(
            lvl for lvl in OptimizationLevel if self.enabled(InferenceConfig(optimization_level=lvl).resolved())
        )

    def supports(self, model: torch.nn.Module, ctx: PlanContext) -> Support:
        """Whether this plugin can be applied to ``model``; override to say no with a reason."""
        return Support.yes()

    def apply(self, model: torch.nn.Module, ctx: ApplyContext) -> None:
        """Patch ``model`` through ``ctx.patch``. Raising rolls back every plugin's changes."""
        raise NotImplementedError(f"plugin {self.name!r} does not implement apply()")

    def __repr__(self) -> str:
        return f"<flux_infer plugin {self.name!r}>"


def validate_plugin(plugin: Any) -> None:
    """Raise TypeError/ValueError naming what is wrong with a registered plugin's metadata."""
    if not isinstance(plugin, Plugin):
        raise TypeError(f"expected an instance of flux_infer.Plugin, got {plugin!r}")
    if not isinstance(plugin.name, str) or not _NAME.match(plugin.name):
        raise ValueError(f"{type(plugin).__name__}.name must be a lowercase identifier, got {plugin.name!r}")
    for attr in ("provides", "requires", "conflicts", "after", "before"):
        value = getattr(plugin, attr)
        if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"plugin {plugin.name!r}: `{attr}` must be a collection of strings, got {value!r}")
    if not all(isinstance(lvl, OptimizationLevel) for lvl in plugin.levels):
        raise TypeError(f"plugin {plugin.name!r}: `levels` must hold OptimizationLevel members")
    if plugin.config_field is not None and plugin.config_field not in InferenceConfig.__dataclass_fields__:
        raise ValueError(f"plugin {plugin.name!r}: config_field {plugin.config_field!r} is not an InferenceConfig field")


def not_yet_available(feature: str) -> Support:
    """The answer of a registered plugin whose implementation has not landed yet."""
    return Support.no(f"{feature} is not available in this version of flux-infer yet")
