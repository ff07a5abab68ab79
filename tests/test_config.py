import dataclasses

import pytest

from flux_infer import FROM_LEVEL, InferenceConfig, OptimizationLevel, Quantization, SpeculativeMethod
from flux_infer.errors import InvalidConfigError


@pytest.mark.parametrize("text", ["O0", "O1", "O2", "O3", "o2"])
def test_level_strings_are_accepted(text):
    assert OptimizationLevel.parse(text) is OptimizationLevel[text.upper()]
    assert InferenceConfig(optimization_level=text).optimization_level is OptimizationLevel[text.upper()]


@pytest.mark.parametrize("bad", ["O4", "fast", "", 1, None])
def test_unknown_level_is_a_value_error_listing_the_levels(bad):
    with pytest.raises(InvalidConfigError, match="O0, O1, O2, O3") as info:
        InferenceConfig(optimization_level=bad)
    assert isinstance(info.value, ValueError)


def test_presets_fill_unset_switches():
    o0, o1, o2, o3 = (InferenceConfig(optimization_level=lvl).resolved() for lvl in OptimizationLevel)
    assert (o0.use_flash_attention, o0.fused_kernels, o0.quantization) == (False, False, None)
    assert (o1.use_flash_attention, o1.fused_kernels, o1.quantization, o1.paged_kv_cache) == (True, True, None, False)
    assert (o2.quantization, o2.paged_kv_cache, o2.quantize_kv_cache, o2.speculative) == (
        Quantization.INT8, True, True, None)
    assert (o3.quantization, o3.speculative, o3.adaptive_moe, o3.speculative_gamma) == (
        Quantization.INT4_AWQ, SpeculativeMethod.PROMPT_LOOKUP, True, 5)
    for config in (o0, o1, o2, o3):
        assert all(getattr(config, f.name) is not FROM_LEVEL for f in dataclasses.fields(config))


def test_explicit_fields_override_the_level_and_are_remembered():
    config = InferenceConfig(optimization_level="O2", quantization=None, use_flash_attention=False)
    resolved = config.resolved()
    assert resolved.quantization is None and resolved.use_flash_attention is False
    assert resolved.paged_kv_cache is True
    assert resolved.explicit("quantization") and not resolved.explicit("paged_kv_cache")
    assert resolved.resolved() is resolved


def test_draft_model_makes_o3_speculate_with_it():
    assert InferenceConfig(optimization_level="O3", draft_model="tiny").resolved().speculative is SpeculativeMethod.DRAFT


def test_seed_readme_fields_and_strings():
    config = InferenceConfig(batch_size=32, optimization_level=OptimizationLevel.O3, quantize_kv_cache=True,
                             use_flash_attention=True, quantization="int4", speculative="self")
    assert config.quantization is Quantization.INT4 and config.speculative is SpeculativeMethod.SELF
    assert config.batch_size == 32


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantization="int3"), "unknown quantization 'int3'"),
    (dict(speculative="medusa"), "unknown speculative 'medusa'"),
    (dict(quantization_group_size=96), "quantization_group_size=96 is not supported"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(speculative_gamma=0), "speculative_gamma"),
    (dict(complexity_score=1.5), "complexity_score"),
    (dict(use_flash_attention="yes"), "use_flash_attention must be True or False"),
    (dict(plugins=["a"], exclude=["a"]), "both in `plugins` and in `exclude`"),
    (dict(plugins=[3]), "plugin names"),
])
def test_bad_values_are_clear_value_errors(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        InferenceConfig(**kwargs)


def test_config_is_frozen_and_lists_become_tuples():
    config = InferenceConfig(plugins=["x"], exclude="y")
    assert config.plugins == ("x",) and config.exclude == ("y",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 2
