"""flux_infer: make an existing Hugging Face transformers model fast, in place, with one line.

    import flux_infer
    flux_infer.optimize(model, level="O1")   # patches the model; model.flux_report says what was done
    flux_infer.revert(model)                 # back to exactly the original
"""

from flux_infer.config import FROM_LEVEL, InferenceConfig, OptimizationLevel, Quantization, SpeculativeMethod
from flux_infer.hookspecs import hookimpl
from flux_infer.loading import load
from flux_infer.optimize import check, is_optimized, optimize, revert
from flux_infer.pipeline import FluxPipeline
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.support import Support

__version__ = "0.1.0"

__all__ = [
    "FROM_LEVEL",
    "ApplyContext",
    "FluxPipeline",
    "InferenceConfig",
    "OptimizationLevel",
    "PlanContext",
    "Plugin",
    "Quantization",
    "SpeculativeMethod",
    "Support",
    "__version__",
    "check",
    "hookimpl",
    "is_optimized",
    "load",
    "optimize",
    "revert",
]
