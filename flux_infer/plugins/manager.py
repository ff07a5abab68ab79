"""The pluggy plugin manager: built-in plugin modules, entry points of installed packages, load errors.

Created lazily on first use (``get_plugin_manager()``), so ``import flux_infer`` loads no third-party code.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import threading
import warnings
from types import ModuleType
from typing import Any

import pluggy

from flux_infer import hookspecs
from flux_infer.adapters.base import ModelAdapter
from flux_infer.plugins.base import Plugin, validate_plugin

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "flux_infer"
ENV_DISABLE_AUTOLOAD = "FLUX_INFER_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOWLIST = "FLUX_INFER_PLUGINS"

BUILTIN_MODULES = (
    "flux_infer.adapters.builtin",
    "flux_infer.plugins.builtin",
)


@dataclasses.dataclass(frozen=True)
class PluginSource:
    """Where a pluggy plugin (a module of hook implementations) came from."""

    name: str  # the pluggy registration name: entry-point name, or the module name of a built-in
    package: str  # distribution name
    version: str


@dataclasses.dataclass(frozen=True)
class LoadError:
    source: str  # entry-point or plugin name
    package: str
    error: str

    def __str__(self) -> str:
        return f"{self.source} (from {self.package}): {self.error}"


def _own_version() -> str:
    try:
        return importlib.metadata.version("flux-infer")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class PluginManager:
    """Registry of optimization plugins and adapters, fed through the hooks of ``flux_infer.hookspecs``."""

    def __init__(self, *, autoload: bool | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, PluginSource] = {}
        self.load_errors: list[LoadError] = []
        self._plugins: dict[str, Plugin] | None = None
        self._plugin_sources: dict[str, PluginSource] = {}
        self._adapters: dict[str, ModelAdapter] | None = None
        version = _own_version()
        for module_name in BUILTIN_MODULES:
            module = importlib.import_module(module_name)
            self.register(module, source=PluginSource(module_name, "flux-infer", version))
        if autoload is None:
            autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").strip().lower() not in ("1", "true", "yes")
        if autoload:
            self.load_entry_points()

    @property
    def hook(self) -> Any:
        return self._pm.hook

    # ---- registration -------------------------------------------------------------------------------------
    def register(self, plugin_module: ModuleType | object, *, name: str | None = None,
                 source: PluginSource | None = None) -> str:
        """Register a module/object of hook implementations (what an entry point names). Returns its name."""
        registered = self._pm.register(plugin_module, name=name or (source.name if source else None))
        if registered is None:
            raise ValueError(f"{plugin_module!r} is blocked or already registered")
        self._sources[registered] = source or PluginSource(registered, _package_of(plugin_module), "unknown")
        self._invalidate()
        return registered

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._sources.pop(name, None)
        self._invalidate()

    def load_entry_points(self) -> int:
        """Load the ``flux_infer`` entry points of installed packages; a failing one is recorded and skipped."""
        allow = os.environ.get(ENV_ALLOWLIST)
        allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
        count = 0
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or self._pm.has_plugin(ep.name):
                    continue
                if allowed is not None and ep.name not in allowed:
                    continue
                package, version = dist.metadata["Name"] or "unknown", dist.version or "unknown"
                try:
                    module = ep.load()
                    self.register(module, name=ep.name, source=PluginSource(ep.name, package, version))
                except Exception as exc:  # isolate: a broken package never breaks flux_infer
                    self._load_failed(ep.name, package, exc)
                    continue
                count += 1
        return count

    def _load_failed(self, source: str, package: str, exc: BaseException) -> None:
        error = LoadError(source, package, f"{type(exc).__name__}: {exc}")
        self.load_errors.append(error)
        warnings.warn(f"flux_infer: plugin {error} -- skipped", RuntimeWarning, stacklevel=3)

    def _invalidate(self) -> None:
        self._plugins = None
        self._adapters = None

    # ---- what the hooks provide -----------------------------------------------------------------------------
    def _collect(self, hook_name: str) -> list[tuple[PluginSource, Any]]:
        """Call each implementation of a list-returning hook separately, so one failure is isolated."""
        results = []
        for impl in getattr(self._pm.hook, hook_name).get_hookimpls():  # registration order
            source = self._sources.get(impl.plugin_name, PluginSource(impl.plugin_name, "unknown", "unknown"))
            try:
                items = list(impl.function() or ())
            except Exception as exc:
                self._load_failed(source.name, source.package, exc)
                continue
            results.append((source, items))
        return results

    @property
    def plugins(self) -> dict[str, Plugin]:
        """Every registered optimization plugin by name, in registration order (built-ins first)."""
        if self._plugins is None:
            plugins: dict[str, Plugin] = {}
            self._plugin_sources = {}
            for source, items in self._collect("flux_infer_register_plugins"):
                for plugin in items:
                    try:
                        validate_plugin(plugin)
                        if plugin.name in plugins:
                            owner = self._plugin_sources[plugin.name].package
                            raise ValueError(f"plugin name {plugin.name!r} is already registered by {owner}")
                    except (TypeError, ValueError) as exc:
                        self._load_failed(source.name, source.package, exc)
                        continue
                    plugins[plugin.name] = plugin
                    self._plugin_sources[plugin.name] = source
            self._plugins = plugins
        return self._plugins

    def source_of(self, plugin_name: str) -> PluginSource:
        self.plugins  # noqa: B018 (fills the table)
        return self._plugin_sources[plugin_name]

    def version_of(self, plugin: Plugin) -> str:
        return plugin.version or self.source_of(plugin.name).version

    @property
    def adapters(self) -> dict[str, ModelAdapter]:
        """model_type -> adapter; an installed package's adapter replaces a built-in one for the same type."""
        if self._adapters is None:
            adapters: dict[str, ModelAdapter] = {}
            for source, items in self._collect("flux_infer_register_adapters"):
                for adapter in items:
                    if not isinstance(adapter, ModelAdapter):
                        self._load_failed(source.name, source.package,
                                          TypeError(f"expected a ModelAdapter, got {adapter!r}"))
                        continue
                    for model_type in adapter.model_types:
                        if model_type in adapters:
                            logger.info("adapter %s replaces %s for %s", adapter.name, adapters[model_type].name,
                                        model_type)
                        adapters[model_type] = adapter
            self._adapters = adapters
        return self._adapters

    def adapter_for(self, model: Any) -> ModelAdapter | None:
        """The adapter for ``model``: a ``flux_infer_select_adapter`` answer, else the model_type registry."""
        chosen = self.hook.flux_infer_select_adapter(model=model)
        if chosen is not None:
            return chosen
        return lookup_adapter(self.adapters, model.config)


def lookup_adapter(adapters: dict[str, ModelAdapter], config: Any) -> ModelAdapter | None:
    adapter = adapters.get(getattr(config, "model_type", None))
    if adapter is None or not adapter.wraps_text_model:
        return adapter
    text_config = getattr(config, adapter.text_config or "", None)
    inner = adapters.get(getattr(text_config, "model_type", None))
    return adapter.around(inner) if inner is not None and not inner.wraps_text_model else None


def _package_of(obj: object) -> str:
    module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "") or ""
    return module.split(".")[0] or "unknown"


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, created (and entry points loaded) on first call."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager; the next ``get_plugin_manager()`` reloads everything (tests use this)."""
    global _manager
    with _lock:
        _manager = None
