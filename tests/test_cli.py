"""The `flux-infer` command: plugins, check, generate, and the generated level table in docs/."""

import json
import subprocess
import sys
from pathlib import Path

from flux_infer.cli import levels_markdown, main

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_plugins_lists_metadata_as_json(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in data["plugins"]}
    assert rows["kv_cache_int8"]["requires"] == ["kv_cache"]
    assert rows["flash_attention"]["levels"] == ["O1", "O2", "O3"]
    assert rows["quantization"]["lossless"] is False
    assert rows["fused_kernels"]["package"] == "flux-infer"


def test_console_script_runs():
    exe = Path(sys.executable).parent / "flux-infer"  # the venv's script, whether or not it is on PATH
    assert exe.is_file(), "the flux-infer console script is not installed (pip install -e .)"
    out = subprocess.run([str(exe), "plugins"], capture_output=True, text=True, check=True).stdout
    assert "fused_kernels" in out and "provides: attention" in out


def test_check_prints_the_plan_with_reasons(capsys):
    assert main(["check", "smollm2-135m", "--level", "O3"]) == 0
    out = capsys.readouterr().out
    assert "plan for llama at O3" in out
    assert "1. quantization" in out and "adaptive_moe" in out and "not a mixture-of-experts model" in out


def test_check_with_overrides(capsys):
    assert main(["check", "--level", "O1", "--no-flash-attention", "--no-fast-generate", "--exclude",
                 "fused_kernels"]) == 0
    assert "(nothing to apply)" in capsys.readouterr().out


def test_generate_compare_shows_baseline_and_identical_tokens(capsys):
    assert main(["generate", "smollm2-135m", "--level", "O1", "What is the capital of France?",
                 "--max-new-tokens", "12", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "baseline (transformers)" in out and "flux_infer O1" in out
    assert "tokens: identical to the baseline" in out
    assert "Paris" in out


def test_bad_level_is_a_clean_error(capsys):
    assert main(["check", "--level", "O7"]) == 2
    assert "unknown optimization level 'O7'" in capsys.readouterr().err


def test_docs_level_table_is_generated_from_metadata():
    assert (DOCS / "levels.md").read_text() == levels_markdown(), (
        "docs/levels.md is stale: regenerate it with `flux-infer plugins --markdown > docs/levels.md`")
