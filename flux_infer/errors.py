"""Typed errors. Every error a user can cause is a ``ValueError`` or ``TypeError`` subclass whose message
names the problem and the fix; ``FluxInferError`` is the common base for ``except`` clauses."""

from __future__ import annotations


class FluxInferError(Exception):
    """Base class of every error raised by flux_infer."""


class InvalidConfigError(FluxInferError, ValueError):
    """An InferenceConfig field or optimize() argument has a bad value (unknown level, bad group size, ...)."""


class PlanError(FluxInferError, ValueError):
    """The requested set of plugins cannot be turned into a plan."""


class UnknownPluginError(PlanError):
    """A plugin name in ``plugins``/``exclude`` is not registered."""


class MissingRequirementError(PlanError):
    """A selected plugin requires a capability that nothing selected can provide."""


class PluginConflictError(PlanError):
    """Two selected plugins conflict with each other."""


class DependencyCycleError(PlanError):
    """The ordering constraints between selected plugins form a cycle."""


class UnsupportedModelError(FluxInferError, ValueError):
    """The model (or this plugin on this model) is not supported; raised in strict mode instead of skipping."""


class ModelStateError(FluxInferError, ValueError):
    """The model is in a state optimize()/revert() cannot work with (meta device, already optimized, ...)."""


class AlreadyOptimizedError(ModelStateError):
    """optimize() was called on a model that flux_infer already optimized."""


class NotOptimizedError(ModelStateError):
    """revert() was called on a model that flux_infer has not optimized."""


class NotATransformersModelError(FluxInferError, TypeError):
    """optimize()/check() was given something that is not a ``transformers.PreTrainedModel``."""


class PluginApplyError(FluxInferError, RuntimeError):
    """A plugin raised while patching the model; every change was rolled back. ``__cause__`` is the original."""


class ModelLoadError(FluxInferError, ValueError):
    """flux_infer.load() could not find or convert the requested model."""
