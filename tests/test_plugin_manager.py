"""Discovery through entry points: the example third-party package, environment switches, broken packages."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flux_infer
from flux_infer import InferenceConfig
from flux_infer.plugins.manager import (
    ENV_ALLOWLIST,
    ENV_DISABLE_AUTOLOAD,
    PluginManager,
    get_plugin_manager,
    reset_plugin_manager,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flux_infer_example_plugin"


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The example plugin package, really built and installed by pip into its own site directory."""
    target = tmp_path_factory.mktemp("example-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True)
    return target


@pytest.fixture
def on_path(monkeypatch):
    def add(path):
        monkeypatch.syspath_prepend(str(path))
    return add


def fake_installed_package(root: Path, dist: str, module: str, source: str, ep_name: str) -> Path:
    """An installed package as pip lays it out: a module plus a .dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[flux_infer]\n{ep_name} = {module}\n")
    return root


def test_example_package_is_discovered_ordered_applied_and_reverted(example_site, on_path, plugin_manager,
                                                                     smollm2):
    on_path(example_site)
    reset_plugin_manager()
    manager = get_plugin_manager()  # the process-wide manager optimize() uses, now seeing the package
    assert "layer_timer" in manager.plugins
    source = manager.source_of("layer_timer")
    assert (source.package, source.version, source.name) == ("flux-infer-example-plugin", "0.2.0", "layer_timer")
    model, tokenizer = smollm2
    config = InferenceConfig(optimization_level="O1", plugins=["layer_timer"])
    plan = flux_infer.check(model, config=config)
    assert plan.names[:2] == ("flash_attention", "fused_kernels") and "layer_timer" in plan.names

    flux_infer.optimize(model, config=config)
    assert [r.name for r in model.flux_report.applied][-1] == "layer_timer"
    assert model.flux_report.applied[-1].version == "0.2.0"
    with torch.no_grad():
        model(**tokenizer("hello world", return_tensors="pt"))
    timings = model.layer_timings
    assert set(timings.calls) == set(range(30)) and all(c == 1 for c in timings.calls.values())

    flux_infer.revert(model)
    assert not hasattr(model, "layer_timings")
    with torch.no_grad():
        model(**tokenizer("hello again", return_tensors="pt"))
    assert all(c == 1 for c in timings.calls.values())  # the hooks are gone


def test_disable_autoload_and_allowlist(example_site, on_path, monkeypatch):
    on_path(example_site)
    monkeypatch.setenv(ENV_DISABLE_AUTOLOAD, "1")
    assert "layer_timer" not in PluginManager().plugins
    monkeypatch.delenv(ENV_DISABLE_AUTOLOAD)
    monkeypatch.setenv(ENV_ALLOWLIST, "something_else")
    assert "layer_timer" not in PluginManager().plugins
    monkeypatch.setenv(ENV_ALLOWLIST, "something_else, layer_timer")
    assert "layer_timer" in PluginManager().plugins
    assert "flash_attention" in PluginManager().plugins  # built-ins are never filtered


def test_a_package_that_fails_to_import_is_reported_and_skipped(tmp_path, on_path):
    on_path(fake_installed_package(tmp_path, "broken-flux-plugin", "broken_flux_plugin",
                                   "raise ImportError('needs libfoo.so')\n", "broken"))
    with pytest.warns(RuntimeWarning, match="broken .from broken-flux-plugin.*needs libfoo"):
        manager = PluginManager()
    assert [e.source for e in manager.load_errors] == ["broken"]
    assert "ImportError: needs libfoo.so" in manager.load_errors[0].error
    assert "fused_kernels" in manager.plugins


def test_a_hook_that_raises_or_returns_garbage_is_isolated(tmp_path, on_path):
    on_path(fake_installed_package(tmp_path, "bad-hooks", "bad_hooks", """
        import flux_infer

        class Dup(flux_infer.Plugin):
            name = "fused_kernels"

        @flux_infer.hookimpl
        def flux_infer_register_plugins():
            return [Dup(), "not a plugin"]

        @flux_infer.hookimpl
        def flux_infer_register_adapters():
            raise RuntimeError("adapter registry exploded")
        """, "bad_hooks"))
    with pytest.warns(RuntimeWarning):
        manager = PluginManager()
        plugins, adapters = manager.plugins, manager.adapters
    errors = " | ".join(str(e) for e in manager.load_errors)
    assert "already registered by flux-infer" in errors
    assert "expected an instance of flux_infer.Plugin" in errors
    assert "adapter registry exploded" in errors
    assert type(plugins["fused_kernels"]).__module__ == "flux_infer.plugins.fused_kernels"
    assert "llama" in adapters


def test_import_flux_infer_loads_no_entry_points(example_site):
    code = ("import sys; sys.path.insert(0, %r); import flux_infer; "
            "print('flux_infer_example_plugin' in sys.modules)") % str(example_site)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
