"""Shared fixtures: the real SmolLM2-135M model (fp32, CPU), tiny random-init models of every adapter's type,
and an isolated plugin manager for tests that register their own plugins."""

from __future__ import annotations

import copy

import pytest
import torch

import flux_infer
from flux_infer.plugins import manager as manager_module

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (marked cuda)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_base():
    """SmolLM2-135M-Instruct in fp32 on the CPU; never modified (tests use the `smollm2` copy)."""
    model, tokenizer = flux_infer.load("smollm2-135m", device="cpu", dtype=torch.float32)
    return model, tokenizer


@pytest.fixture
def smollm2(smollm2_base):
    """A private deep copy of SmolLM2, so a failing test cannot leak patches into the next one."""
    model, tokenizer = smollm2_base
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def plugin_manager(monkeypatch):
    """A fresh process-wide plugin manager (built-ins + installed entry points), discarded after the test."""
    manager_module.reset_plugin_manager()
    yield manager_module.get_plugin_manager()
    manager_module.reset_plugin_manager()


def model_snapshot(model: torch.nn.Module) -> dict:
    """Everything revert/rollback must restore: tensors, module tree, instance attributes, config."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
        "modules": [(name, type(m)) for name, m in model.named_modules()],
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "config": model.config.to_dict(),
        "attn": model.config._attn_implementation,
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["attrs"] == before["attrs"]
    assert after["config"] == before["config"]
    assert after["attn"] == before["attn"]
    assert after["ptrs"] == before["ptrs"]
    assert after["state"].keys() == before["state"].keys()
    for key, tensor in before["state"].items():
        assert torch.equal(after["state"][key], tensor), key
