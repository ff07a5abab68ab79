"""flux's decode loop behind model.generate on SmolLM2 (CPU, fp32): transformers' results option by option."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import flux_infer
from flux_infer import InferenceConfig


@pytest.fixture(scope="module")
def pair(smollm2_base):
    """(baseline, optimized) SmolLM2 copies; the optimized one runs generate on flux's loop."""
    import copy

    base, tokenizer = smollm2_base
    fast = copy.deepcopy(base)
    flux_infer.optimize(fast, config=InferenceConfig(optimization_level="O1", use_flash_attention=False,
                                                     fused_kernels=False))
    assert [r.name for r in fast.flux_report.applied] == ["fast_generate"]
    return base, fast, tokenizer


def chat(tokenizer, *prompts):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def both(pair, inputs, **kwargs):
    base, fast, tokenizer = pair
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    with torch.no_grad():
        return base.generate(**inputs, **kwargs), fast.generate(**inputs, **kwargs)


@pytest.mark.parametrize("options", [
    dict(max_new_tokens=20),
    dict(max_length=40),  # counts the prompt too
    dict(max_new_tokens=12, repetition_penalty=1.3),
    dict(max_new_tokens=10, min_new_tokens=10),  # EOS suppressed until 10 tokens
    dict(max_new_tokens=30, eos_token_id=[2, 28]),  # a list: "." (id 28) also ends a row
])
def test_greedy_options_match_transformers(pair, options):
    inputs = chat(pair[2], "What is the capital of France?", "Name a colour.")
    expected, got = both(pair, inputs, **GREEDY, **options)
    assert torch.equal(got, expected)


def test_invalid_options_raise_like_transformers(pair):
    inputs = chat(pair[2], "hi")
    for model in pair[:2]:
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate(**inputs, max_new_tokens=0)


def test_stop_strings_match_transformers(pair):
    tokenizer = pair[2]
    inputs = chat(tokenizer, "Count from one to ten in words, separated by commas.", "Say hello.")
    expected, got = both(pair, inputs, **GREEDY, max_new_tokens=30, stop_strings=["56"], tokenizer=tokenizer)
    assert torch.equal(got, expected)
    text = tokenizer.decode(got[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.endswith("56")  # the row stopped right there; the other row went on


def test_stop_strings_need_the_tokenizer(pair):
    with pytest.raises(ValueError, match="tokenizer"):
        pair[1].generate(**chat(pair[2], "hi"), max_new_tokens=3, stop_strings=["x"])


def test_scores_and_logits_like_transformers(pair):
    inputs = chat(pair[2], "Tell me a fact about the moon.")
    options = dict(**GREEDY, max_new_tokens=8, return_dict_in_generate=True, output_scores=True, output_logits=True,
                   repetition_penalty=1.2)
    expected, got = both(pair, inputs, **options)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == 8
    for mine, theirs in zip(got.scores + got.logits, expected.scores + expected.logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_with_a_seed_and_respects_the_warpers(pair):
    base, fast, tokenizer = pair
    inputs = chat(tokenizer, "Write a short poem about autumn.")
    sample = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, max_new_tokens=24,
                  pad_token_id=tokenizer.pad_token_id)
    first = fast.generate(**inputs, **sample, seed=7)
    assert torch.equal(fast.generate(**inputs, **sample, seed=7), first)
    assert not torch.equal(fast.generate(**inputs, **sample, seed=8), first)
    torch.manual_seed(3)
    a = fast.generate(**inputs, **sample)
    torch.manual_seed(3)
    assert torch.equal(fast.generate(**inputs, **sample), a)
    greedy = fast.generate(**inputs, **GREEDY, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    for narrow in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):  # each leaves only the top token
        options = {**sample, "top_k": None, "top_p": None, "min_p": None, **narrow}
        assert torch.equal(fast.generate(**inputs, **options, seed=1), greedy)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_sees_prompt_then_each_token(pair):
    base, fast, tokenizer = pair
    inputs = chat(tokenizer, "What is 2 + 2?")
    streamer = Collect()
    out = fast.generate(**inputs, **GREEDY, max_new_tokens=10, streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    assert streamer.ended and torch.equal(streamer.chunks[0], inputs["input_ids"])
    streamed = torch.cat([c.view(-1) for c in streamer.chunks[1:]])
    assert torch.equal(streamed, out[0, inputs["input_ids"].shape[1]:])


def test_missing_attention_mask_is_inferred_like_transformers(pair):
    tokenizer = pair[2]
    ids = tokenizer(["The sky is"], return_tensors="pt")["input_ids"]
    expected, got = both(pair, {"input_ids": ids}, **GREEDY, max_new_tokens=8)
    assert torch.equal(got, expected)


def test_unsupported_options_fall_back_with_one_warning_naming_them(pair):
    inputs = chat(pair[2], "Name three fruits.")
    with pytest.warns(UserWarning, match=r"generate\(num_beams=3\) is not supported.*transformers' generate"):
        expected, got = both(pair, inputs, **GREEDY, max_new_tokens=8, num_beams=3)
    assert torch.equal(got, expected)
    with pytest.warns(UserWarning, match="no_repeat_ngram_size=2"):
        both(pair, inputs, **GREEDY, max_new_tokens=8, no_repeat_ngram_size=2)


def test_right_padding_falls_back(pair):
    tokenizer = pair[2]
    tokenizer.padding_side = "right"
    inputs = tokenizer(["Hello there, how are", "Hi"], return_tensors="pt", padding=True)
    with pytest.warns(UserWarning, match="not left-padded"):
        pair[1].generate(**inputs, **GREEDY, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)


def test_revert_restores_transformers_generate(smollm2):
    model, tokenizer = smollm2
    flux_infer.optimize(model, "O1")
    assert "generate" in vars(model)
    flux_infer.revert(model)
    assert "generate" not in vars(model)


@pytest.mark.parametrize("switches, layout", [
    (dict(paged_kv_cache=True), "paged"),
    (dict(quantize_kv_cache=True), "paged-int8"),  # pulls in the paged layout it requires
])
def test_generate_on_the_paged_and_int8_caches(smollm2_base, switches, layout):
    import copy

    base, tokenizer = smollm2_base
    model = copy.deepcopy(base)
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", **switches))
    details = {r.name: r.details for r in model.flux_report.applied}
    assert details["fast_generate"]["kv_cache"] == layout
    inputs = chat(tokenizer, "What is the capital of France?", "Write a haiku about the sea.", "Hi!")
    with torch.no_grad():
        expected = base.generate(**inputs, **GREEDY, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
        got = model.generate(**inputs, **GREEDY, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
    if layout == "paged":
        assert torch.equal(got, expected)  # a different layout of the same numbers
    else:
        assert (got == expected).float().mean() > 0.9  # lossy, but barely (perplexity: tests/test_engine.py)


@pytest.mark.parametrize("vocab", [128256, 49152, 32001, 1000])
def test_two_pass_argmax_is_torch_argmax_including_ties(vocab):
    from flux_infer.generation.sampling import argmax_last

    scores = torch.randn(4, vocab, generator=torch.Generator().manual_seed(vocab))
    scores[1] = scores[1].mul(2).round()  # many equal values, the maximum among them
    scores[2, 3::97] = scores[2].max() + 1  # tied maxima in many chunks: the first one wins
    scores[3, -1] = float("inf")
    assert torch.equal(argmax_last(scores), scores.argmax(dim=-1))
    assert torch.equal(argmax_last(scores[0]), scores[0].argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_steps_take_the_one_launch_attention_kernel_where_it_applies(smollm2_base, monkeypatch, dtype):
    """On CUDA a static-cache decode step takes flux::rotary_cache_attention's kernel when the runner's tensors meet
    its requirements, checked here on the CPU with the same tensors through the reference: a bf16 SmolLM2 (head_dim
    64, 3 query heads per kv head) takes it at every layer of every decode step; a float32 one (not the kernel's)
    never calls the op, whose fallback would copy q and k, and rotates them in place as before."""
    import copy

    from flux_infer import kernels

    base, tokenizer = smollm2_base
    model = copy.deepcopy(base).to(dtype)
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1"))
    op = kernels.rotary_cache_attention
    calls = []

    def recording_reference(*args):
        calls.append(kernels.rotary_attention_fits(*args[:11]))
        return kernels.rotary_cache_attention_ref(*args)

    monkeypatch.setattr(op, "native", lambda device: True)
    monkeypatch.setattr(op, "reference", recording_reference)
    with torch.no_grad():
        out = model.generate(**chat(tokenizer, "Hi", "Name a colour."), max_new_tokens=3,
                             pad_token_id=tokenizer.pad_token_id, **GREEDY)
    assert out.shape[1] > 3
    if dtype == torch.bfloat16:
        assert len(calls) >= 2 * 30 and all(calls)  # two decode steps x 30 layers at least
    else:
        assert calls == []
