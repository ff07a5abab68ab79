"""Architecture adapters: the only place that knows where an architecture keeps its parts."""

from flux_infer.adapters.base import ACTIVATIONS, MLPStyle, ModelAdapter, NormStyle

__all__ = ["ACTIVATIONS", "MLPStyle", "ModelAdapter", "NormStyle"]
