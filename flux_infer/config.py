"""Optimization levels and the ``InferenceConfig`` that selects plugins.

A level is a preset: each switch of ``InferenceConfig`` left at ``FROM_LEVEL`` takes the level's value, and a
switch given explicitly overrides it (``InferenceConfig(optimization_level="O2", quantization=None)`` is O2
without weight quantization). ``resolved()`` returns the config with every switch filled in.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable
from typing import Any, Final

from flux_infer.errors import InvalidConfigError


class OptimizationLevel(str, enum.Enum):
    """O0 = nothing; O1 = lossless speed-ups; O2 = O1 + INT8 weights + paged INT8 KV cache;
    O3 = O2 with 4-bit AWQ weights + speculative decoding + adaptive MoE routing."""

    O0 = "O0"
    O1 = "O1"
    O2 = "O2"
    O3 = "O3"

    @classmethod
    def parse(cls, value: OptimizationLevel | str) -> OptimizationLevel:
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise InvalidConfigError(
            f"unknown optimization level {value!r}; use one of {', '.join(m.value for m in cls)} "
            "(or flux_infer.OptimizationLevel.O1, ...)"
        )

    def __str__(self) -> str:
        return self.value


class Quantization(str, enum.Enum):
    """Weight quantization: per-channel INT8, group-wise INT4 round-to-nearest, or INT4 with AWQ scales."""

    INT8 = "int8"
    INT4 = "int4"
    INT4_AWQ = "int4-awq"

    def __str__(self) -> str:
        return self.value


class SpeculativeMethod(str, enum.Enum):
    """Where speculative draft tokens come from."""

    DRAFT = "draft"  # a smaller draft model (InferenceConfig.draft_model)
    PROMPT_LOOKUP = "prompt_lookup"  # n-gram matches in the prompt and the text so far
    SELF = "self"  # early-exit self-speculation on the model's own layers

    def __str__(self) -> str:
        return self.value


class _FromLevel:
    """Sentinel: take this switch from the optimization level's preset."""

    _instance: _FromLevel | None = None

    def __new__(cls) -> _FromLevel:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FROM_LEVEL"

    def __reduce__(self) -> str:
        return "FROM_LEVEL"


FROM_LEVEL: Final = _FromLevel()

# The level presets: the single source of what each level switches on. Keys are InferenceConfig fields.
_PRESETS: Final[dict[OptimizationLevel, dict[str, Any]]] = {
    OptimizationLevel.O0: dict(
        use_flash_attention=False, fused_kernels=False, fast_generate=False, quantization=None,
        paged_kv_cache=False, quantize_kv_cache=False, speculative=None, adaptive_moe=False,
    ),
    OptimizationLevel.O1: dict(
        use_flash_attention=True, fused_kernels=True, fast_generate=True, quantization=None,
        paged_kv_cache=False, quantize_kv_cache=False, speculative=None, adaptive_moe=False,
    ),
    OptimizationLevel.O2: dict(
        use_flash_attention=True, fused_kernels=True, fast_generate=True, quantization=Quantization.INT8,
        paged_kv_cache=True, quantize_kv_cache=True, speculative=None, adaptive_moe=False,
    ),
    OptimizationLevel.O3: dict(
        use_flash_attention=True, fused_kernels=True, fast_generate=True, quantization=Quantization.INT4_AWQ,
        paged_kv_cache=True, quantize_kv_cache=True, speculative=SpeculativeMethod.PROMPT_LOOKUP, adaptive_moe=True,
    ),
}
PRESET_FIELDS: Final = tuple(_PRESETS[OptimizationLevel.O0])
SUPPORTED_GROUP_SIZES: Final = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """What to optimize. Switches left at ``FROM_LEVEL`` follow ``optimization_level``.

    The field names of the original FluxInfer API (``batch_size``, ``use_flash_attention``,
    ``quantize_kv_cache``, ``optimization_level``) are kept; strings are accepted wherever an enum is expected.
    """

    optimization_level: OptimizationLevel | str = OptimizationLevel.O1
    batch_size: int = 1
    # Switches (FROM_LEVEL = the level's preset)
    use_flash_attention: bool | _FromLevel = FROM_LEVEL
    fused_kernels: bool | _FromLevel = FROM_LEVEL
    fast_generate: bool | _FromLevel = FROM_LEVEL
    quantization: Quantization | str | None | _FromLevel = FROM_LEVEL
    paged_kv_cache: bool | _FromLevel = FROM_LEVEL
    quantize_kv_cache: bool | _FromLevel = FROM_LEVEL
    speculative: SpeculativeMethod | str | None | _FromLevel = FROM_LEVEL
    adaptive_moe: bool | _FromLevel = FROM_LEVEL
    # Parameters of the switches
    quantization_group_size: int = 128
    quantize_lm_head: bool = False  # lm_head too (embeddings always stay in full precision)
    calibration_data: Any = None  # AWQ: texts, or token ids [samples, length]; None = built-in text
    draft_model: Any = None
    speculative_gamma: int = 5
    complexity_score: float | None = None
    use_cuda_graphs: bool = True  # capture the decode step in CUDA graphs (fast_generate on CUDA)
    # Extra plugins to enable by name, and plugins to leave out (by name)
    plugins: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # Filled in by resolved(): the switches the user set explicitly (the rest came from the level preset)
    _explicit: frozenset[str] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("optimization_level", OptimizationLevel.parse(self.optimization_level))
        if self.quantization not in (None, FROM_LEVEL):
            set_("quantization", _parse_enum(Quantization, self.quantization, "quantization"))
        if self.speculative not in (None, FROM_LEVEL):
            set_("speculative", _parse_enum(SpeculativeMethod, self.speculative, "speculative"))
        for name in ("use_flash_attention", "fused_kernels", "fast_generate", "paged_kv_cache", "quantize_kv_cache",
                     "adaptive_moe"):
            value = getattr(self, name)
            if value is not FROM_LEVEL and not isinstance(value, bool):
                raise InvalidConfigError(f"InferenceConfig.{name} must be True or False, got {value!r}")
        if not isinstance(self.use_cuda_graphs, bool):
            raise InvalidConfigError(f"InferenceConfig.use_cuda_graphs must be True or False, got {self.use_cuda_graphs!r}")
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("speculative_gamma", self.speculative_gamma, minimum=1)
        _check_int("quantization_group_size", self.quantization_group_size, minimum=1)
        if self.quantization_group_size not in SUPPORTED_GROUP_SIZES:
            raise InvalidConfigError(
                f"quantization_group_size={self.quantization_group_size} is not supported; "
                f"use one of {SUPPORTED_GROUP_SIZES}"
            )
        if self.complexity_score is not None and not (
            isinstance(self.complexity_score, (int, float)) and 0.0 <= self.complexity_score <= 1.0
        ):
            raise InvalidConfigError(f"complexity_score must be a number in [0, 1], got {self.complexity_score!r}")
        set_("plugins", _names("plugins", self.plugins))
        set_("exclude", _names("exclude", self.exclude))
        both = sorted(set(self.plugins) & set(self.exclude))
        if both:
            raise InvalidConfigError(f"plugin(s) {', '.join(both)} are both in `plugins` and in `exclude`; pick one")

    @property
    def is_resolved(self) -> bool:
        return self._explicit is not None

    def explicit(self, field: str) -> bool:
        """Whether ``field`` was set explicitly rather than taken from the level preset."""
        if self._explicit is not None:
            return field in self._explicit
        return getattr(self, field) is not FROM_LEVEL

    def resolved(self) -> InferenceConfig:
        """This config with every FROM_LEVEL switch replaced by the level's preset value."""
        if self.is_resolved:
            return self
        preset = _PRESETS[self.optimization_level]
        values = {f: preset[f] for f in PRESET_FIELDS if getattr(self, f) is FROM_LEVEL}
        if "speculative" in values and values["speculative"] is not None and self.draft_model is not None:
            values["speculative"] = SpeculativeMethod.DRAFT
        result = dataclasses.replace(self, **values)
        object.__setattr__(result, "_explicit", frozenset(f for f in PRESET_FIELDS if f not in values))
        return result


def _parse_enum(cls: type[enum.Enum], value: Any, field: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise InvalidConfigError(f"unknown {field} {value!r}; use None or one of {choices}") from None


def _check_int(field: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidConfigError(f"InferenceConfig.{field} must be an integer >= {minimum}, got {value!r}")


def _names(field: str, value: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    names = tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise InvalidConfigError(f"InferenceConfig.{field} must be plugin names (strings), got {value!r}")
    return names
