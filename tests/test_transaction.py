"""Bad input and failing plugins: typed errors, and the model left exactly as it was."""

import pytest
import torch
from conftest import assert_same_snapshot, model_snapshot
from plugin_helpers import Provider, make_plugin

import flux_infer
from flux_infer import InferenceConfig
from flux_infer.errors import InvalidConfigError, ModelStateError, NotATransformersModelError, PluginApplyError


def half_then_raise(self, model, ctx):
    """Changes several kinds of state, then fails."""
    layer = model.model.layers[3]
    ctx.patch.replace_module(layer, "mlp", torch.nn.Identity())
    ctx.patch.setattr(model.model.layers[0].self_attn.q_proj, "weight",
                      torch.nn.Parameter(torch.zeros_like(model.model.layers[0].self_attn.q_proj.weight)))
    ctx.patch.register_buffer(model.model, "scratch", torch.ones(4))
    ctx.patch.setattr(model.config, "use_cache", False)
    ctx.patch.bind_method(model, "generate", lambda self, *a, **k: None)
    raise RuntimeError("simulated failure halfway through")


def test_a_plugin_failing_halfway_rolls_back_every_plugin(smollm2, plugin_manager):
    model, tokenizer = smollm2
    plugin_manager.register(Provider(make_plugin("breaks", apply=half_then_raise, after=("fused_kernels",))),
                            name="test-plugins")
    inputs = tokenizer(["The quick brown fox"], return_tensors="pt")
    before = model_snapshot(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    with pytest.raises(PluginApplyError, match="breaks failed.*simulated failure.*rolled back.*exclude=\\['breaks'\\]"
                       ) as info:
        flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", plugins=["breaks"]))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert_same_snapshot(before, model_snapshot(model))  # fused_kernels, applied before it, is undone too
    assert "generate" not in vars(model) and not hasattr(model, "flux_report")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    flux_infer.optimize(model, "O1")  # and the model can be optimized afterwards
    assert flux_infer.is_optimized(model)


class FailingAfterHook:
    @flux_infer.hookimpl
    def flux_infer_after_optimize(self, model, report):
        raise ValueError("telemetry backend down")


def test_an_after_optimize_hook_failure_rolls_back_too(smollm2, plugin_manager):
    model, _ = smollm2
    plugin_manager.register(FailingAfterHook(), name="failing-hook")
    before = model_snapshot(model)
    with pytest.raises(PluginApplyError, match="flux_infer_after_optimize hook failed.*telemetry"):
        flux_infer.optimize(model, "O1")
    assert_same_snapshot(before, model_snapshot(model))


def test_non_transformers_model_is_a_type_error():
    with pytest.raises(NotATransformersModelError, match="PreTrainedModel") as info:
        flux_infer.optimize(torch.nn.Linear(2, 2))
    assert isinstance(info.value, TypeError)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        flux_infer.check("gpt2")


def test_compiled_model_gets_a_hint(smollm2):
    model, _ = smollm2
    with pytest.raises(NotATransformersModelError, match="optimize the model first, then compile"):
        flux_infer.optimize(torch.compile(model))


def test_meta_device_model_is_refused_untouched():
    from transformers import AutoModelForCausalLM
    from tiny_models import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ModelStateError, match="meta device.*from_pretrained"):
        flux_infer.optimize(model, "O1")
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert not flux_infer.is_optimized(model)


def test_unknown_level_and_conflicting_level_arguments(smollm2):
    model, _ = smollm2
    before = model_snapshot(model)
    with pytest.raises(InvalidConfigError, match="unknown optimization level 'O9'"):
        flux_infer.optimize(model, "O9")
    with pytest.raises(InvalidConfigError, match="disagrees"):
        flux_infer.optimize(model, "O2", config=InferenceConfig(optimization_level="O1"))
    with pytest.raises(TypeError, match="InferenceConfig"):
        flux_infer.optimize(model, config={"optimization_level": "O1"})
    assert_same_snapshot(before, model_snapshot(model))


def test_strict_mode_raises_where_a_plugin_would_be_skipped(smollm2):
    model, _ = smollm2
    before = model_snapshot(model)
    with pytest.raises(flux_infer.errors.UnsupportedModelError, match="speculative_decoding"):
        flux_infer.optimize(model, "O3", strict=True)
    assert_same_snapshot(before, model_snapshot(model))


def test_strict_accepts_plugins_that_have_nothing_to_do_here(smollm2):
    model, _ = smollm2
    flux_infer.optimize(model, "O1", strict=True)  # fuse_projections: a GPU-only gain, not applicable on the CPU
    assert "fuse_projections" in [s.name for s in model.flux_report.skipped]
