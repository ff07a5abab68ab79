"""``optimize`` / ``revert`` / ``check``: plan -> check -> apply (transactionally) -> report.

``optimize`` patches the model in place and returns the same object. Any plugin raising rolls back every change
made so far and raises ``PluginApplyError``: the model is exactly as before. Optimizing a model twice raises
``AlreadyOptimizedError``: call ``revert(model)`` first to change the level.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from flux_infer.adapters.base import ModelAdapter
from flux_infer.config import InferenceConfig, OptimizationLevel
from flux_infer.errors import (
    AlreadyOptimizedError,
    FluxInferError,
    InvalidConfigError,
    ModelStateError,
    NotATransformersModelError,
    NotOptimizedError,
    PluginApplyError,
    UnsupportedModelError,
)
from flux_infer.patching import PatchRecorder
from flux_infer.plugins.base import ApplyContext, PlanContext, Plugin
from flux_infer.plugins.graph import Plan, resolve
from flux_infer.plugins.manager import PluginManager, get_plugin_manager
from flux_infer.report import MemoryUsage, OptimizationReport, PluginResult
from flux_infer.support import Support

_STATE = "_flux_state"


@dataclasses.dataclass(frozen=True)
class _FluxState:
    plan: Plan
    recorder: PatchRecorder


def check(model: Any, level: OptimizationLevel | str | None = None, *, config: InferenceConfig | None = None,
          strict: bool = False) -> Plan:
    """The plan ``optimize`` would carry out (ordered plugins, skipped ones with reasons); changes nothing."""
    resolved = _make_config(level, config)
    _validate_model(model)
    return _plan(model, resolved, strict, get_plugin_manager())[0]


def optimize(model: Any, level: OptimizationLevel | str | None = None, *, config: InferenceConfig | None = None,
             strict: bool = False) -> Any:
    """Optimize ``model`` in place at ``level`` (default O1, or ``config.optimization_level``); returns it.

    ``strict=True`` raises ``UnsupportedModelError`` where a plugin would otherwise be skipped with a reason.
    The result is described by ``model.flux_report``.
    """
    resolved = _make_config(level, config)
    _validate_model(model)
    manager = get_plugin_manager()
    plan, adapter = _plan(model, resolved, strict, manager)
    device, dtype = _device_dtype(model)
    recorder = PatchRecorder()
    memory_before = MemoryUsage.measure(model)
    started = time.perf_counter()
    results: list[PluginResult] = []
    kernels: dict[str, str] = {}
    current = "flux_infer_after_optimize hook"
    shared: dict[str, Any] = {}
    try:
        for step in plan.steps:
            current = step.name
            recorder.owned_by(step.name)
            changes_before, t0 = len(recorder), time.perf_counter()
            ctx = ApplyContext(resolved, adapter, device, dtype, patch=recorder, shared=shared)
            with torch.no_grad():
                step.plugin.apply(model, ctx)
            kernels.update(ctx.kernels)
            results.append(PluginResult(step.name, manager.version_of(step.plugin), step.plugin.lossless,
                                        len(recorder) - changes_before, time.perf_counter() - t0, dict(ctx.details)))
        current = "flux_infer_after_optimize hook"
        recorder.owned_by(None)
        report = OptimizationReport(
            config=resolved, model_type=plan.model_type, adapter=plan.adapter, applied=tuple(results),
            skipped=plan.skipped, kernels=kernels, memory_before=memory_before,
            memory_after=MemoryUsage.measure(model), seconds=time.perf_counter() - started,
        )
        recorder.setattr(model, "flux_report", report)
        recorder.setattr(model, _STATE, _FluxState(plan, recorder))
        manager.hook.flux_infer_after_optimize(model=model, report=report)
    except Exception as exc:
        undo_errors = recorder.rollback()
        note = f" ({len(undo_errors)} undo steps failed: {undo_errors})" if undo_errors else ""
        raise PluginApplyError(
            f"{current} failed while optimizing this {plan.model_type} model: {type(exc).__name__}: {exc}. "
            f"Every change was rolled back{note}; the model is unchanged. To optimize without it, pass "
            f"config=InferenceConfig(optimization_level={str(resolved.optimization_level)!r}, exclude=[{current!r}])"
        ) from exc
    except BaseException:  # KeyboardInterrupt and the like: undo, then let it through unchanged
        recorder.rollback()
        raise
    return model


def revert(model: Any) -> Any:
    """Undo everything ``optimize`` did to ``model``; returns it, exactly as it was before."""
    state = getattr(model, "__dict__", {}).get(_STATE)
    if state is None:
        raise NotOptimizedError(
            f"this {type(model).__name__} was not optimized by flux_infer (or was already reverted); nothing to revert"
        )
    errors = state.recorder.rollback()
    if errors:
        raise FluxInferError(f"revert could not undo {len(errors)} change(s): {errors}")
    return model


def is_optimized(model: Any) -> bool:
    return _STATE in getattr(model, "__dict__", {})


def _make_config(level: OptimizationLevel | str | None, config: InferenceConfig | None) -> InferenceConfig:
    if config is None:
        return InferenceConfig(optimization_level=OptimizationLevel.O1 if level is None else level).resolved()
    if not isinstance(config, InferenceConfig):
        raise TypeError(f"config must be a flux_infer.InferenceConfig, got {type(config).__name__}")
    if level is not None and OptimizationLevel.parse(level) is not config.optimization_level:
        raise InvalidConfigError(
            f"level={str(level)!r} disagrees with config.optimization_level={config.optimization_level}; pass only "
            "one of them"
        )
    return config.resolved()


def _validate_model(model: Any) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        hint = ""
        if isinstance(model, torch.nn.Module) and hasattr(model, "_orig_mod"):
            hint = " It looks like a torch.compile wrapper: optimize the model first, then compile it."
        raise NotATransformersModelError(
            f"flux_infer needs a transformers PreTrainedModel (e.g. from AutoModelForCausalLM.from_pretrained), "
            f"got {type(model).__module__}.{type(model).__name__}.{hint}"
        )
    if is_optimized(model):
        raise AlreadyOptimizedError(
            f"this model is already optimized at {model.flux_report.config.optimization_level}; call "
            "flux_infer.revert(model) before optimizing it again"
        )
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_meta:
            raise ModelStateError(
                f"`{name}` is on the meta device (the model has no real weights); load it with from_pretrained() "
                "or materialize it (model.to_empty(device=...) and load a state_dict) before optimizing"
            )


def _device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def _plan(model: Any, config: InferenceConfig, strict: bool, manager: PluginManager
          ) -> tuple[Plan, ModelAdapter | None]:
    device, dtype = _device_dtype(model)
    if device.type == "cuda":  # register the device kernels (built once per process) before plugins look at them
        from flux_infer.kernels import cuda

        cuda.load()
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    adapter = manager.adapter_for(model)
    if adapter is None:
        known = ", ".join(sorted(manager.adapters))
        adapter_answer = Support.no(f"no adapter for model_type {model_type!r} (adapters exist for: {known}); "
                                    "a package can add one through the flux_infer_register_adapters hook")
    else:
        adapter_answer = adapter.check(model)
        if not adapter_answer:
            adapter = None
    ctx = PlanContext(config, adapter, device, dtype)

    def supports(plugin: Plugin) -> Support:
        if plugin.needs_adapter and adapter is None:
            return adapter_answer
        try:
            return plugin.supports(model, ctx)
        except Exception as exc:  # a broken supports() must not break optimize for everyone else
            if strict:
                raise UnsupportedModelError(f"plugin {plugin.name!r}: supports() raised {exc!r}") from exc
            return Support.no(f"its supports() check raised {type(exc).__name__}: {exc}")

    plan = resolve(manager.plugins, config, supports, model_type=model_type,
                   adapter=adapter.name if adapter else None, strict=strict)
    return plan, adapter
