"""Custom ops (``torch.ops.flux.*``) with a pure-PyTorch reference beside each one.

Each op module defines the op with ``torch.library.custom_op``, its fake (meta) implementation for
``torch.compile``/CUDA graphs, and ``<op>_ref``: the reference with the same signature, which CPU runs use and
GPU tests compare against. This package never imports ``transformers``.
"""

from flux_infer.kernels.activation import ACTIVATIONS, act_mul, act_mul_ref
from flux_infer.kernels.norm import rms_norm, rms_norm_ref
from flux_infer.kernels.registry import implementation

__all__ = ["ACTIVATIONS", "act_mul", "act_mul_ref", "implementation", "rms_norm", "rms_norm_ref"]
