"""The patched ``model.generate``: transformers' semantics on flux's decode loop, or a clean fallback.

The options transformers resolves (the model's generation_config, then the call's kwargs) are checked against
what the loop implements; anything else (beam search, constraints, custom logits processors, ...) runs
transformers' own ``generate`` for that call, with one warning naming the option: never a wrong answer.

The loop keeps everything on the device: tokens, finished flags and the first finishing step of each row. The
host looks at them only every ``SYNC_EVERY`` steps (to stop early) or every step when a streamer is attached.
Plain greedy decoding (no sampling, penalty, streamer, stop strings or per-step outputs) hands the steps after
the first to ``FluxDecoder.greedy``, which selects the tokens inside the (graph-captured) step as well.
"""

from __future__ import annotations

import collections
import copy
import warnings
from typing import Any

import torch

from flux_infer.generation.cache import is_left_padded
from flux_infer.generation.decoder import FluxDecoder
from flux_infer.generation.sampling import SamplingParams, TokenSelector

SYNC_EVERY = 16
# plain greedy decoding selects its tokens on the device, inside the captured step (FluxDecoder.greedy); False:
# the host-driven loop, one step at a time (an A/B switch for benchmarks/decode.py)
GREEDY_ON_DEVICE = True

# GenerationConfig fields the loop implements.
SUPPORTED = {
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
    "return_dict_in_generate", "output_scores", "output_logits", "use_cache",
}
# Fields that do not change what a decoder-only model generates without beams.
INERT = {
    "_from_model_config", "transformers_version", "decoder_start_token_id", "cache_implementation", "cache_config",
    "compile_config", "disable_compile", "early_stopping", "length_penalty", "num_beams", "output_attentions",
    "output_hidden_states", "typical_p", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "num_return_sequences", "remove_invalid_values", "renormalize_logits", "low_memory", "max_cache_len",
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "prefill_chunk_size", "continuous_batching_config",
}
# ...provided they keep these values (anything else needs transformers' generate).
INERT_VALUES: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "typical_p": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "output_attentions": (None, False), "output_hidden_states": (None, False),
    "remove_invalid_values": (None, False), "renormalize_logits": (None, False),
}
MODEL_KWARGS = {"attention_mask", "input_ids", "tokenizer", "use_cache"}
UNSUPPORTED_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                         "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask")


def unsupported_options(generation_config: Any, model_kwargs: dict[str, Any], arguments: dict[str, Any]) -> list[str]:
    """The options of this call the flux loop does not implement (empty: it can run)."""
    found = [f"{name}=..." for name in UNSUPPORTED_ARGUMENTS if arguments.get(name) is not None]
    defaults = generation_config._get_default_generation_params()
    for name, value in vars(generation_config).items():
        if name in SUPPORTED or value is None or value == defaults.get(name, None):
            continue
        if name in INERT and value in INERT_VALUES.get(name, (value,)):
            continue
        if name.startswith("_") and name != "_from_model_config":
            continue
        found.append(f"{name}={value!r}")
    found += [f"{name}=..." for name, value in model_kwargs.items() if name not in MODEL_KWARGS and value is not None]
    return found


def flux_generate(model: Any, decoder: FluxDecoder, original: Any, inputs: torch.Tensor | None = None,
                  generation_config: Any = None, logits_processor: Any = None, stopping_criteria: Any = None,
                  prefix_allowed_tokens_fn: Any = None, synced_gpus: Any = None, assistant_model: Any = None,
                  streamer: Any = None, negative_prompt_ids: Any = None, negative_prompt_attention_mask: Any = None,
                  *, seed: int | None = None, **kwargs: Any) -> Any:
    """``model.generate`` with the same signature; ``seed`` makes sampling reproducible for this call."""
    arguments = dict(logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                     prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, synced_gpus=synced_gpus,
                     assistant_model=assistant_model, negative_prompt_ids=negative_prompt_ids,
                     negative_prompt_attention_mask=negative_prompt_attention_mask)

    def fallback(reason: str) -> Any:
        warnings.warn(f"flux_infer: {reason}; this call runs transformers' generate", stacklevel=3)
        if seed is not None:
            torch.manual_seed(seed)
        return original(inputs, generation_config, streamer=streamer, **arguments, **kwargs)

    try:
        config, model_kwargs = model._prepare_generation_config(generation_config, **copy.copy(kwargs))
    except (AttributeError, TypeError) as exc:  # a transformers release we do not know
        return fallback(f"could not read the generation options ({exc})")
    unsupported = unsupported_options(config, model_kwargs, arguments)
    if unsupported:
        return fallback(f"generate({', '.join(unsupported)}) is not supported by flux's decode loop")
    input_ids = inputs if inputs is not None else model_kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return fallback("generate without 2-D input_ids")
    attention_mask = model_kwargs.get("attention_mask")
    pad_id, eos_ids = _special_ids(config, input_ids)
    if attention_mask is None:
        attention_mask = _infer_attention_mask(input_ids, pad_id, eos_ids)
    if not is_left_padded(attention_mask):
        return fallback("attention_mask is not left-padded (pad on the left for decoder-only generation)")
    if config.stop_strings is not None and model_kwargs.get("tokenizer") is None:
        raise ValueError("generate(stop_strings=...) needs the tokenizer: pass tokenizer=... as transformers does")
    return _decode_loop(model, decoder, input_ids, attention_mask, config, pad_id, eos_ids,
                        streamer=streamer, seed=seed, tokenizer=model_kwargs.get("tokenizer"))


def _special_ids(config: Any, input_ids: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    eos = config.eos_token_id
    eos_list = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = config.pad_token_id
    if pad is None and eos_list:
        pad = eos_list[0]  # what transformers does (it warns about it)
    eos_ids = torch.tensor(eos_list, device=input_ids.device) if eos_list else None
    return (0 if pad is None else int(pad)), eos_ids


def _infer_attention_mask(input_ids: torch.Tensor, pad_id: int, eos_ids: torch.Tensor | None) -> torch.Tensor:
    """transformers' rule: mask the pad token only if it occurs and differs from every EOS token."""
    pad_is_eos = eos_ids is not None and bool((eos_ids == pad_id).any())
    if (input_ids == pad_id).any() and not pad_is_eos:
        return input_ids.ne(pad_id).long()
    return torch.ones_like(input_ids)


def _max_new_tokens(config: Any, prompt_len: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    return max(int(config.max_length) - prompt_len, 0)


def _decode_loop(model: Any, decoder: FluxDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 config: Any, pad_id: int, eos_ids: torch.Tensor | None, *, streamer: Any, seed: int | None,
                 tokenizer: Any) -> Any:
    runner = decoder.runner
    device = runner.device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch, prompt_len = input_ids.shape
    max_new = _max_new_tokens(config, prompt_len)
    min_new = max(int(config.min_new_tokens or 0), int(config.min_length or 0) - prompt_len)
    sequences = torch.full((batch, prompt_len + max_new), pad_id, dtype=torch.long, device=device)
    sequences[:, :prompt_len] = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if max_new == 0:
        return _finish(config, sequences[:, :prompt_len], [], [], streamer)

    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    params = SamplingParams(do_sample=bool(config.do_sample), temperature=float(config.temperature or 1.0),
                            top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
                            repetition_penalty=config.repetition_penalty)
    select = TokenSelector(params, prompt_ids=input_ids, vocab_size=runner.vocab_size, eos_ids=eos_ids,
                           generator=generator)
    keep_scores, keep_logits = bool(config.output_scores), bool(config.output_logits)
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    logits, meta = decoder.prefill(input_ids, attention_mask, max_new)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    finish_step = torch.full((batch,), max_new, dtype=torch.long, device=device)
    stop_checker = _StopStrings(config.stop_strings, tokenizer, prompt_len) if config.stop_strings else None
    sync_every = 1 if streamer is not None else SYNC_EVERY
    greedy_on_device = (GREEDY_ON_DEVICE and select.plain_greedy and streamer is None and stop_checker is None
                        and not keep_scores and not keep_logits and (min_new <= 1 or eos_ids is None)
                        and hasattr(decoder, "greedy"))  # (the paged decoder steps token by token)
    steps = 0
    for step in range(max_new):
        tokens, scores = select(logits, suppress_eos=step < min_new)
        if keep_scores:
            scores_out.append(scores.clone())
        if keep_logits:
            logits_out.append(logits.clone())
        tokens = torch.where(unfinished, tokens, pad_id)
        sequences[:, prompt_len + step] = tokens
        select.observe(tokens)
        if eos_ids is not None:
            newly = unfinished & torch.isin(tokens, eos_ids)
            finish_step = torch.where(newly, step, finish_step)
            unfinished &= ~newly
        steps = step + 1
        if streamer is not None:
            streamer.put(tokens.cpu())
        if steps == max_new:
            break
        if greedy_on_device:
            steps = _greedy_rest(decoder, tokens, unfinished, finish_step, meta, eos_ids, pad_id, max_new,
                                 sequences[:, prompt_len:])
            break
        if steps % sync_every == 0:
            if stop_checker is not None:
                stop_checker.apply(sequences, steps, unfinished, finish_step)
            if not bool(unfinished.any()):
                break
        logits = decoder.decode(tokens[:, None], meta)
    if stop_checker is not None:
        stop_checker.apply(sequences, steps, unfinished, finish_step)
    finish = finish_step.tolist()
    length = steps if any(f >= max_new for f in finish) else max(finish) + 1
    for row, f in enumerate(finish):  # rows stopped by a stop string after the fact: pad what followed
        if f + 1 < length:
            sequences[row, prompt_len + f + 1:] = pad_id
    return _finish(config, sequences[:, :prompt_len + length], scores_out[:length], logits_out[:length], streamer)


def _greedy_rest(decoder: FluxDecoder, tokens: torch.Tensor, unfinished: torch.Tensor, finish_step: torch.Tensor,
                 meta: Any, eos_ids: torch.Tensor | None, pad_id: int, max_new: int, generated: torch.Tensor) -> int:
    """Greedy steps 1 .. max_new - 1 on the device after the first token ``tokens``: fills ``generated``
    ``[B, max_new]`` and ``unfinished`` / ``finish_step`` in place; returns the number of steps taken. Every
    ``SYNC_EVERY`` steps it reads whether any row was still unfinished one window earlier: the device keeps a
    window of steps queued while the host waits, and stopping a window late only computes pad tokens."""
    batch = tokens.shape[0]
    run = decoder.greedy(tokens, unfinished, finish_step, meta, eos_ids, pad_id)
    steps, since_sync = 1, 0
    pending: collections.deque[_DeviceFlag] = collections.deque()
    while steps < max_new:
        done = run.advance(max_new - steps)
        steps, since_sync = steps + done, since_sync + done
        if since_sync >= SYNC_EVERY and steps < max_new and eos_ids is not None:  # (no EOS: no row can finish)
            since_sync = 0
            pending.append(_DeviceFlag(run.state.unfinished[:batch].any()))
            # the flag of the window before this one: the device still has this window's steps queued meanwhile
            if len(pending) > 1 and not pending.popleft().value():
                break
    state = run.state
    generated[:, 1:steps].copy_(state.out[:batch, 1:steps])
    unfinished.copy_(state.unfinished[:batch])
    finish_step.copy_(state.finish_step[:batch])
    return steps


class _DeviceFlag:
    """A 0-d boolean on the device, read later without stalling the device: copied to pinned host memory behind
    an event (on the CPU, read at once)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if flag.device.type != "cuda":
            self.host = flag
            return
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def value(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


def _finish(config: Any, sequences: torch.Tensor, scores: list[torch.Tensor], logits: list[torch.Tensor],
            streamer: Any) -> Any:
    if streamer is not None:
        streamer.end()
    if not config.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(scores) if config.output_scores else None,
                                     logits=tuple(logits) if config.output_logits else None)


class _StopStrings:
    """Finds, for each unfinished row, the first generated token after which the text contains a stop string."""

    def __init__(self, stop_strings: str | list[str], tokenizer: Any, prompt_len: int) -> None:
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len

    def apply(self, sequences: torch.Tensor, steps: int, unfinished: torch.Tensor, finish_step: torch.Tensor) -> None:
        alive = unfinished.tolist()
        if not any(alive):
            return
        generated = sequences[:, self.prompt_len:self.prompt_len + steps].tolist()
        for row, is_alive in enumerate(alive):
            if not is_alive:
                continue
            stop = self._first_stop(generated[row])
            if stop is not None:
                unfinished[row] = False
                finish_step[row] = stop

    def _first_stop(self, tokens: list[int]) -> int | None:
        text = self.tokenizer.decode(tokens)
        if not any(s in text for s in self.stops):
            return None
        for end in range(1, len(tokens) + 1):  # the earliest token that completes a stop string
            if any(s in self.tokenizer.decode(tokens[:end]) for s in self.stops):
                return end - 1
        return None
