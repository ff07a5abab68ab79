"""O0 and O1 on the real SmolLM2-135M weights: identical greedy tokens, report, revert, check."""

import pytest
import torch
from conftest import assert_same_snapshot, model_snapshot

import flux_infer
from flux_infer.errors import AlreadyOptimizedError, NotOptimizedError

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers larger than 100 and explain why each one is prime.",
    "Hi!",
]


def chat_batch(tokenizer, prompts):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def greedy(model, tokenizer, batch, n=24):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("level", ["O0", "O1"])
def test_greedy_tokens_identical_single_prompt_and_left_padded_batch(smollm2, level):
    model, tokenizer = smollm2
    single = chat_batch(tokenizer, PROMPTS[:1])
    batch = chat_batch(tokenizer, PROMPTS)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must actually be left-padded"
    expected_single, expected_batch = greedy(model, tokenizer, single), greedy(model, tokenizer, batch)

    assert flux_infer.optimize(model, level) is model
    assert torch.equal(greedy(model, tokenizer, single), expected_single)
    assert torch.equal(greedy(model, tokenizer, batch), expected_batch)
    assert "Paris" in tokenizer.decode(expected_single[0])


def test_o1_report_says_what_ran(smollm2):
    model, _ = smollm2
    flux_infer.optimize(model, "O1")
    report = model.flux_report
    assert [r.name for r in report.applied] == ["flash_attention", "fused_kernels", "fast_generate"]
    assert report.lossless and report.adapter == "llama" and report.model_type == "llama"
    fused = report.applied[1]
    assert fused.details == {"norms": 30 * 2 + 1, "gated_mlps": 30}
    assert report.kernels == {"attention": "sdpa", "rms_norm": "reference", "act_mul": "reference",
                              "rotary_cache_write_": "reference", "cache_attention": "reference",
                              "rotary_cache_attention": "reference", "add_rms_norm": "reference"}
    assert report.applied[2].details == {"kv_cache": "static", "cuda_graphs": False}
    assert report.memory_before.model_bytes == report.memory_after.model_bytes > 500 * 2**20
    assert model.config._attn_implementation == "flux"
    text = str(report)
    assert "flash_attention" in text
    assert [s.name for s in report.skipped] == ["fuse_projections"]  # a GPU-only gain, skipped with its reason
    assert "on the CPU there is nothing to gain" in text


def test_o0_applies_nothing_and_is_still_revertible(smollm2):
    model, _ = smollm2
    before = model_snapshot(model)
    flux_infer.optimize(model, "O0")
    assert model.flux_report.applied == ()
    flux_infer.revert(model)
    assert_same_snapshot(before, model_snapshot(model))


def test_revert_restores_the_exact_original(smollm2):
    model, tokenizer = smollm2
    batch = chat_batch(tokenizer, PROMPTS[:2])
    before = model_snapshot(model)
    with torch.no_grad():
        logits = model(**batch).logits
    flux_infer.optimize(model, "O1")
    assert model_snapshot(model)["modules"] != before["modules"]
    assert flux_infer.revert(model) is model
    assert_same_snapshot(before, model_snapshot(model))
    assert not hasattr(model, "flux_report") and not flux_infer.is_optimized(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    with pytest.raises(NotOptimizedError, match="nothing to revert"):
        flux_infer.revert(model)


def test_optimizing_twice_is_an_error_until_reverted(smollm2):
    model, _ = smollm2
    flux_infer.optimize(model, "O1")
    with pytest.raises(AlreadyOptimizedError, match="revert"):
        flux_infer.optimize(model, "O2")
    flux_infer.revert(model)
    flux_infer.optimize(model, "O0")
    assert model.flux_report.config.optimization_level == flux_infer.OptimizationLevel.O0


def test_check_changes_nothing(smollm2):
    model, _ = smollm2
    before = model_snapshot(model)
    plan = flux_infer.check(model, "O3")
    assert plan.names == ("quantization", "flash_attention", "fused_kernels", "paged_kv_cache", "kv_cache_int8",
                          "fast_generate")
    assert_same_snapshot(before, model_snapshot(model))
    assert "speculative_decoding" in str(plan)
