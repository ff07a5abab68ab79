"""Every built-in adapter on a tiny random-init model of its type: plan, optimize, compare, revert."""

import pytest
import torch
from conftest import assert_same_snapshot, model_snapshot
from plugin_helpers import forward_logits
from tiny_models import ALL_TYPES, FAST_TYPES, tiny_inputs, tiny_model

import flux_infer
from flux_infer.adapters import ModelAdapter
from flux_infer.errors import UnsupportedModelError
from flux_infer.hookspecs import hookimpl


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_adapter_plans_optimizes_and_reverts(model_type):
    model = tiny_model(model_type)
    inputs = tiny_inputs()
    before = model_snapshot(model)
    expected = forward_logits(model, inputs)

    plan = flux_infer.check(model, "O1")
    assert plan.adapter is not None and plan.adapter.startswith(model_type.split("_text")[0])
    skipped = {s.name: s.reason for s in plan.skipped}
    names = ("flash_attention", "fused_kernels") + (("fast_generate",) if model_type in FAST_TYPES else ())
    if model_type == "gemma2":  # attention logit soft-capping: SDPA cannot, so the plan says why
        names = ("fused_kernels",)
        assert "soft-capping" in skipped["flash_attention"]
    assert plan.names == names
    if model_type not in FAST_TYPES:
        assert skipped["fast_generate"]  # with the reason the decode loop cannot run it

    flux_infer.optimize(model, "O1")
    fused = {r.name: r for r in model.flux_report.applied}["fused_kernels"]
    assert fused.details["norms"] >= 2 * 2 + 1
    assert torch.allclose(forward_logits(model, inputs), expected, rtol=1e-5, atol=1e-5)

    flux_infer.revert(model)
    assert_same_snapshot(before, model_snapshot(model))
    assert torch.equal(forward_logits(model, inputs), expected)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_adapters_are_recognized_as_moe(model_type):
    plan = flux_infer.check(tiny_model(model_type), "O3")
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["adaptive_moe"] != "not a mixture-of-experts model"


@pytest.mark.parametrize("model_type", FAST_TYPES)
def test_fast_generate_matches_transformers_on_a_left_padded_batch(model_type):
    model = tiny_model(model_type)
    inputs = tiny_inputs(batch=3, length=9)
    inputs["attention_mask"][1, :4] = 0  # rows with 2, 4 and 0 padding tokens
    inputs["input_ids"][1, :4] = 0
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = model.generate(**inputs, **kwargs)
    flux_infer.optimize(model, "O1")
    assert "fast_generate" in [r.name for r in model.flux_report.applied]
    assert torch.equal(model.generate(**inputs, **kwargs), expected)


def test_greedy_generation_matches_on_a_tiny_vlm_language_model():
    model = tiny_model("llava")
    inputs = tiny_inputs(batch=1)
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    flux_infer.optimize(model, "O1")
    assert model.model.language_model.config._attn_implementation == "flux"
    assert model.model.vision_tower.config._attn_implementation != "flux"  # only the language model
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), expected)


def test_unknown_model_type_is_skipped_with_a_reason_or_raises_in_strict(plugin_manager):
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    plan = flux_infer.check(model, "O1")
    assert plan.names == ()
    assert all("no adapter for model_type 'my_new_arch'" in s.reason for s in plan.skipped)
    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'my_new_arch'"):
        flux_infer.optimize(model, "O1", strict=True)
    assert not flux_infer.is_optimized(model)


class ThirdPartyAdapters:
    @hookimpl
    def flux_infer_register_adapters(self):
        return [ModelAdapter("my_new_arch", ("my_new_arch",))]


def test_a_registered_adapter_makes_a_new_model_type_work(plugin_manager):
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    plugin_manager.register(ThirdPartyAdapters(), name="third-party-adapters")
    plan = flux_infer.check(model, "O1")
    assert plan.adapter == "my_new_arch" and plan.names == ("flash_attention", "fused_kernels", "fast_generate")


def test_adapter_reports_structure_it_cannot_find(plugin_manager):
    model = tiny_model("llama")
    del model.model.norm
    plan = flux_infer.check(model, "O1")
    assert plan.names == () and "lack norm" in plan.skipped[0].reason
