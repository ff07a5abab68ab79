"""``FluxPipeline``: the original FluxInfer API — load, optimize, generate, with metrics.

    pipeline = FluxPipeline(model_name="smollm2-135m", config=InferenceConfig(optimization_level="O1"))
    response = pipeline.generate("Explain the difference between TCP and UDP")
    print(response["text"], response["metrics"]["latency_ms"])

Prompts are a string (completed as is), chat messages (``[{"role": ..., "content": ...}]``, rendered with the
tokenizer's chat template), or a list of either (generated as one left-padded batch). ``stream=True`` returns an
iterator of text pieces (whole characters: multi-byte UTF-8 split across tokens is held back until complete).

This runs on the optimized ``model.generate``; the continuous-batching engine (issue #5) will take its place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from flux_infer.config import InferenceConfig
from flux_infer.errors import InvalidConfigError
from flux_infer.loading import DEFAULT_MODEL, load
from flux_infer.optimize import is_optimized, optimize

Messages = list[dict[str, str]]
Prompt = str | Messages


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


class _FirstToken(BaseStreamer):
    """A streamer that only notes when the first generated token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class FluxPipeline:
    def __init__(self, model_name: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 config: InferenceConfig | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, strict: bool = False) -> None:
        """Load ``model_name`` (default: SmolLM2-135M-Instruct) or take ``model`` + ``tokenizer``, then optimize
        it with ``config`` (default: O1). An already optimized model is used as it is."""
        if model is None:
            if tokenizer is not None:
                raise InvalidConfigError("tokenizer= was given without model=; pass both, or model_name=")
            model, tokenizer = load(model_name or DEFAULT_MODEL, device=device, dtype=dtype)
        elif model_name is not None:
            raise InvalidConfigError("pass either model_name= or model=, not both")
        elif tokenizer is None:
            raise InvalidConfigError("FluxPipeline(model=...) also needs tokenizer=...")
        if config is not None and not isinstance(config, InferenceConfig):
            raise TypeError(f"config must be a flux_infer.InferenceConfig, got {type(config).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or InferenceConfig()
        if not is_optimized(model):
            optimize(model, config=self.config, strict=strict)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def report(self) -> Any:
        return self.model.flux_report

    # ---- prompts ------------------------------------------------------------------------------------------------
    def _render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if _is_messages(prompt):
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidConfigError("chat messages need a tokenizer with a chat template; pass a string prompt")
            return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        raise InvalidConfigError(f"a prompt must be a string or chat messages [{{'role': ..., 'content': ...}}], got "
                                 f"{type(prompt).__name__}")

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        special = not any(t.startswith(self.tokenizer.bos_token or "\0") for t in texts)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    def _generation_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InvalidConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompt: Prompt | Sequence[Prompt], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, complexity_score: float | None = None, stream: bool = False
                 ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[str]:
        """Generate for one prompt (a dict), a list of prompts (a list of dicts), or stream one (an iterator).

        ``complexity_score`` (0..1) is the routing hint of adaptive MoE routing; it is accepted and validated now and
        used once that plugin is available.
        """
        if complexity_score is not None and not 0.0 <= complexity_score <= 1.0:
            raise InvalidConfigError(f"complexity_score must be in [0, 1], got {complexity_score!r}")
        single = isinstance(prompt, str) or _is_messages(prompt)
        if not single and not isinstance(prompt, (list, tuple)):
            raise InvalidConfigError(f"a prompt must be a string or chat messages [{{'role': ..., 'content': ...}}], "
                                     f"or a list of those; got {type(prompt).__name__}")
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise InvalidConfigError("no prompts given")
        kwargs = self._generation_kwargs(max_new_tokens, temperature, top_p)
        texts = [self._render(p) for p in prompts]
        if stream:
            if not single:
                raise InvalidConfigError("stream=True takes a single prompt")
            return self._stream(texts[0], kwargs)
        inputs = self._encode(texts)
        timer = _FirstToken()
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(**inputs, streamer=timer, **kwargs)
        latency = time.perf_counter() - start
        prompt_len = inputs["input_ids"].shape[1]
        results = []
        for row, mask in zip(out, inputs["attention_mask"], strict=True):
            new = row[prompt_len:]
            completion = new[new != self.tokenizer.pad_token_id] if self.tokenizer.pad_token_id is not None else new
            results.append({
                "text": self.tokenizer.decode(completion, skip_special_tokens=True),
                "metrics": self._metrics(latency, timer.first_token_at, start, int(mask.sum()), len(completion)),
            })
        return results[0] if single else results

    def _metrics(self, latency: float, first: float | None, start: float, prompt_tokens: int,
                 completion_tokens: int) -> dict[str, Any]:
        return {
            "latency_ms": latency * 1e3,
            "ttft_ms": (first - start) * 1e3 if first is not None else None,
            "tokens_per_s": completion_tokens / latency if latency > 0 else 0.0,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
        }

    def _stream(self, text: str, kwargs: dict[str, Any]) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        inputs = self._encode([text])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**inputs, streamer=streamer, **kwargs)
            except BaseException as exc:  # surfaced to the consumer below
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from (piece for piece in streamer if piece)
        finally:
            worker.join()
        if errors:
            raise errors[0]
