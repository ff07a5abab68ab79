"""kv_cache_int8 is the cache the model uses wherever it caches: its own forward, transformers' generate, flux's
decode loop (tests/test_generate.py) and the engine (tests/test_engine.py)."""

import copy
import warnings

import torch

import flux_infer
from flux_infer import InferenceConfig
from flux_infer.generation.hf_cache import Int8Cache


def optimized(base):
    model = copy.deepcopy(base)
    return flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", quantize_kv_cache=True))


def test_a_caching_forward_stores_int8_and_decodes_on(smollm2_base):
    base, tokenizer = smollm2_base
    model = optimized(base)
    ids = tokenizer(["The capital of France is Paris. The capital of Italy is"], return_tensors="pt")
    with torch.no_grad():
        out = model(**ids, use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, Int8Cache) and cache.layers[0].keys.dtype == torch.int8
        reference = base(**ids, use_cache=True)
        agree = (out.logits.argmax(-1) == reference.logits.argmax(-1)).float().mean()
        assert agree >= 0.9  # lossy but close; its perplexity cost is measured in tests/test_engine.py
        token = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, past_key_values=cache, use_cache=True)
        assert step.past_key_values.get_seq_length() == ids["input_ids"].shape[1] + 1
        step_ref = base(input_ids=token, past_key_values=reference.past_key_values, use_cache=True)
        assert step.logits[0, -1].argmax() == step_ref.logits[0, -1].argmax()


def test_transformers_generate_fallback_uses_it_too(smollm2_base):
    base, tokenizer = smollm2_base
    model = optimized(base)
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, kw, out: seen.append(type(kw.get("cache", kw.get("past_key_values"))).__name__),
        with_kwargs=True)
    ids = tokenizer(["Once upon a time"], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(**ids, max_new_tokens=4, num_beams=2, do_sample=False)  # beam search: fallback
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    assert seen and set(seen) == {"Int8Cache"}


def test_revert_restores_the_forward(smollm2_base):
    base, _ = smollm2_base
    model = optimized(base)
    assert "forward" in vars(model)
    flux_infer.revert(model)
    assert "forward" not in vars(model)
