"""The plugin contract: every hook flux_infer calls, in one module.

A plugin package exposes a module (or object) with functions marked ``@flux_infer.hookimpl`` and names it in
the entry-point group ``flux_infer``::

    # pyproject.toml of the third-party package
    [project.entry-points.flux_infer]
    my_plugins = "my_package.flux_plugins"

    # my_package/flux_plugins.py
    import flux_infer

    class MyPlugin(flux_infer.Plugin):
        name = "my_plugin"
        ...

    @flux_infer.hookimpl
    def flux_infer_register_plugins():
        return [MyPlugin()]

The built-in plugins and adapters are registered through these same hooks. Set
``FLUX_INFER_DISABLE_PLUGIN_AUTOLOAD=1`` to load no entry points, or ``FLUX_INFER_PLUGINS=a,b`` to load only
the entry points named ``a`` and ``b``. A package that fails to load is reported by name
(``flux-infer plugins``) and skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from flux_infer.adapters.base import ModelAdapter
    from flux_infer.plugins.base import Plugin
    from flux_infer.report import OptimizationReport

PROJECT_NAME = "flux_infer"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def flux_infer_register_plugins() -> Sequence[Plugin]:
    """Return the optimization plugins this package provides (instances of ``flux_infer.Plugin``).

    Names must be unique across all installed packages; a duplicate is reported as a load error of the package
    that registered it second.
    """


@hookspec
def flux_infer_register_adapters() -> Sequence[ModelAdapter]:
    """Return architecture adapters (``flux_infer.adapters.ModelAdapter``), each claiming ``model_types``.

    An adapter from an installed package replaces a built-in one for the same ``model_type``.
    """


@hookspec(firstresult=True)
def flux_infer_select_adapter(model: Any) -> ModelAdapter | None:
    """Choose the adapter for ``model``; the first non-None answer wins.

    When no implementation answers, ``model.config.model_type`` is looked up among the registered adapters.
    Implement this only for models that ``model_type`` alone cannot identify.
    """


@hookspec
def flux_infer_after_optimize(model: Any, report: OptimizationReport) -> None:
    """Called after every plugin applied, still inside the transaction: raising here rolls everything back."""
