"""The planner: requirements, conflicts, ordering and their typed errors, through check()/optimize()."""

import pytest
import torch
from plugin_helpers import Provider, forward_logits, make_plugin
from tiny_models import tiny_inputs, tiny_model

import flux_infer
from flux_infer import InferenceConfig, Support
from flux_infer.errors import (
    DependencyCycleError,
    MissingRequirementError,
    PlanError,
    PluginConflictError,
    UnknownPluginError,
    UnsupportedModelError,
)


@pytest.fixture
def llama():
    return tiny_model("llama")


def register(manager, *plugins):
    manager.register(Provider(*plugins), name="test-plugins")


def untouched(model, before_logits, inputs):
    assert not flux_infer.is_optimized(model) and not hasattr(model, "applied_order")
    assert torch.equal(forward_logits(model, inputs), before_logits)


def test_cycle_is_an_error_naming_the_cycle(plugin_manager, llama):
    register(plugin_manager, make_plugin("a", after=("b",)), make_plugin("b", after=("c",)),
             make_plugin("c", after=("a",)))
    inputs = tiny_inputs()
    before = forward_logits(llama, inputs)
    with pytest.raises(DependencyCycleError, match=r"cycle: (c must come before b must come before a must come before c|"
                       r"b must come before a must come before c must come before b|"
                       r"a must come before c must come before b must come before a)") as info:
        flux_infer.optimize(llama, config=InferenceConfig(plugins=["a", "b", "c"]))
    assert isinstance(info.value, ValueError)
    untouched(llama, before, inputs)


def test_missing_requirement_names_plugin_and_capability(plugin_manager, llama):
    register(plugin_manager, make_plugin("needy", requires={"teleportation"}))
    with pytest.raises(MissingRequirementError, match="'needy' requires 'teleportation'.*no registered plugin"):
        flux_infer.optimize(llama, config=InferenceConfig(plugins=["needy"]))
    assert not flux_infer.is_optimized(llama)


def test_requirement_whose_provider_is_excluded(plugin_manager, llama):
    register(plugin_manager, make_plugin("needs_attention", requires={"attention"}))
    with pytest.raises(MissingRequirementError, match="flash_attention.*excluded"):
        flux_infer.check(llama, config=InferenceConfig(plugins=["needs_attention"], exclude=["flash_attention"]))


def test_requirement_pulls_in_its_provider_and_orders_it_first(plugin_manager, llama):
    register(plugin_manager, make_plugin("needs_attention", requires={"attention"}))
    plan = flux_infer.check(llama, config=InferenceConfig(optimization_level="O0", plugins=["needs_attention"]))
    assert plan.names == ("flash_attention", "needs_attention")
    assert plan.steps[0].origin == "required by needs_attention"


def test_explicit_conflict_is_an_error_naming_both(plugin_manager, llama):
    register(plugin_manager, make_plugin("x", conflicts={"y"}), make_plugin("y"))
    with pytest.raises(PluginConflictError, match="'x' and 'y' conflict.*exclude"):
        flux_infer.optimize(llama, config=InferenceConfig(plugins=["x", "y"]))
    assert not flux_infer.is_optimized(llama)


def test_conflict_through_a_capability(plugin_manager, llama):
    register(plugin_manager, make_plugin("x", conflicts={"kernels:rms_norm"}))
    with pytest.raises(PluginConflictError, match="'fused_kernels' and 'x' conflict.*x declares a conflict"):
        flux_infer.check(llama, config=InferenceConfig(fused_kernels=True, plugins=["x"]))


def test_two_level_plugins_in_conflict_keep_the_first_registered(plugin_manager, llama):
    register(plugin_manager, make_plugin("x", conflicts={"kernels:rms_norm"},
                                         levels=frozenset({flux_infer.OptimizationLevel.O1})))
    plan = flux_infer.check(llama, "O1", strict=True)  # a preset's own overlap is not the user's error
    assert "fused_kernels" in plan.names and "x" not in plan.names
    assert "conflicts with fused_kernels, which the level also enables" in dict(
        (s.name, s.reason) for s in plan.skipped)["x"]


def test_requested_plugin_replaces_the_level_default_for_the_same_capability(plugin_manager, llama):
    register(plugin_manager, make_plugin("my_attention", provides={"attention"}))
    plan = flux_infer.check(llama, config=InferenceConfig(optimization_level="O1", plugins=["my_attention"]))
    assert "flash_attention" not in plan.names and "my_attention" in plan.names
    reason = dict((s.name, s.reason) for s in plan.skipped)["flash_attention"]
    assert "replaced by my_attention" in reason and "'attention'" in reason


def test_order_follows_after_and_before_by_name_and_capability(plugin_manager, llama):
    register(plugin_manager,
             make_plugin("last", after=("kernels:rms_norm",)),
             make_plugin("first", before=("attention",)),
             make_plugin("middle", after=("first",), before=("last",)))
    config = InferenceConfig(optimization_level="O1", plugins=["last", "first", "middle"])
    plan = flux_infer.check(llama, config=config)
    names = plan.names
    assert names.index("first") < names.index("flash_attention")
    assert names.index("fused_kernels") < names.index("last")
    assert names.index("first") < names.index("middle") < names.index("last")
    flux_infer.optimize(llama, config=config)
    assert llama.applied_order == ["first", "middle", "last"]  # third-party apply order matches the plan
    flux_infer.revert(llama)
    assert not hasattr(llama, "applied_order")


def test_unsupported_provider_cascades_to_its_dependents(plugin_manager, llama):
    register(plugin_manager,
             make_plugin("fussy", provides={"magic"}, supports=lambda self, m, c: Support.no("needs a unicorn")),
             make_plugin("user", requires={"magic"}))
    config = InferenceConfig(plugins=["user"])
    plan = flux_infer.check(llama, config=config)
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["fussy"] == "needs a unicorn"
    assert "fussy" in reasons["user"] and "needs a unicorn" in reasons["user"]
    with pytest.raises(UnsupportedModelError, match="needs a unicorn"):
        flux_infer.check(llama, config=config, strict=True)


def test_a_supports_check_that_raises_is_a_skip_with_the_error(plugin_manager, llama):
    def broken(self, model, ctx):
        raise KeyError("oops")

    register(plugin_manager, make_plugin("buggy", supports=broken))
    plan = flux_infer.check(llama, config=InferenceConfig(plugins=["buggy"]))
    assert "KeyError" in dict((s.name, s.reason) for s in plan.skipped)["buggy"]


def test_unknown_plugin_names_are_listed(plugin_manager, llama):
    with pytest.raises(UnknownPluginError, match="'warp_drive'.*registered plugins are .*flash_attention"):
        flux_infer.check(llama, config=InferenceConfig(plugins=["warp_drive"]))
    with pytest.raises(PlanError):
        flux_infer.check(llama, config=InferenceConfig(exclude=["warp_drive"]))


def test_exclude_removes_a_level_plugin_with_a_reason(plugin_manager, llama):
    plan = flux_infer.check(llama, config=InferenceConfig(optimization_level="O1", exclude=["fused_kernels"]))
    assert plan.names == ("flash_attention", "fast_generate")
    assert ("fused_kernels", "excluded by InferenceConfig.exclude") in [(s.name, s.reason) for s in plan.skipped]


def test_o3_on_a_dense_model_explains_every_skip(plugin_manager, llama):
    plan = flux_infer.check(llama, "O3")
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["adaptive_moe"] == "not a mixture-of-experts model"
    assert set(reasons) >= {"speculative_decoding", "fuse_projections"}
    assert plan.names[0] == "quantization"  # weights first: everything after sees the quantized modules
    assert plan.names.index("kv_cache_int8") < plan.names.index("fast_generate")  # the layout before its user
    assert all(reasons.values())
    assert "plan for llama at O3" in str(plan)
