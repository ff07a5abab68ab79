"""The continuous-batching engine and the paged KV cache on the CPU (fp32 SmolLM2)."""

import pytest
import torch
from tiny_models import tiny_model

from flux_infer import kernels
from flux_infer.engine import BlockManager, Engine, IncrementalDetokenizer
from flux_infer.errors import InvalidConfigError, UnsupportedModelError

TOPICS = ["the sea", "a mountain", "coffee", "rain", "a library", "winter", "a cat", "trains", "the moon", "bread",
          "music", "a garden", "fire", "clocks", "snow", "a bridge", "rivers", "stars", "a market", "paper",
          "wind", "a forest", "glass", "birds", "salt", "a lighthouse", "honey", "maps", "thunder", "a violin",
          "sand", "lanterns"]


def chat_ids(tokenizer, topic, words=1):
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"Write {'a ' * words}line about {topic}."}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("block_size", [15, 16, 17])
@pytest.mark.parametrize("lengths", [(1, 15, 16), (17, 33, 5), (31, 32, 48)])
def test_paged_attention_matches_contiguous_attention(block_size, lengths):
    """Odd lengths, lengths at block boundaries, block size +-1; decode (1 query) and prefill chunks (3)."""
    torch.manual_seed(0)
    heads, kv_heads, dim = 6, 2, 16
    blocks = sum(-(-n // block_size) for n in lengths) + 3
    k_pool = torch.randn(blocks * block_size, kv_heads, dim)
    v_pool = torch.randn(blocks * block_size, kv_heads, dim)
    free = list(torch.randperm(blocks).tolist())  # scattered blocks, as after many allocations
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    for q_len in (1, 3):
        q_lens = [min(q_len, n) for n in lengths]
        starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
        q = torch.randn(int(starts[-1]), heads, dim)
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        out = kernels.paged_attention(q, k_pool, v_pool, table, torch.tensor(lengths, dtype=torch.int32), starts,
                                      block_size, 0.25, 0)
        for s, n in enumerate(lengths):  # the same sequence laid out contiguously
            pos = torch.arange(n)
            rows = table[s, pos // block_size].long() * block_size + pos % block_size
            k = k_pool[rows].permute(1, 0, 2)[None]
            v = v_pool[rows].permute(1, 0, 2)[None]
            lo, hi = int(starts[s]), int(starts[s + 1])
            ref = kernels.cache_attention_ref(q[None, lo:hi], k, v, torch.tensor([0], dtype=torch.int32),
                                              torch.tensor([n], dtype=torch.int32), 0.25, 0)
            torch.testing.assert_close(out[lo:hi], ref[0], rtol=1e-5, atol=1e-5)


def test_block_manager_accounting():
    blocks = BlockManager(num_blocks=10, block_size=16)
    assert blocks.grow("a", 17) and blocks.tables["a"] and len(blocks.tables["a"]) == 2
    assert blocks.grow("a", 32) and len(blocks.tables["a"]) == 2  # still fits
    assert not blocks.grow("b", 16 * 9)  # 8 free: refused, nothing taken
    assert blocks.num_free == 8
    blocks.free("a")
    assert blocks.num_free == 10


def test_each_prompt_alone_equals_it_mixed_with_the_others(smollm2_base):
    model, tokenizer = smollm2_base
    prompts = [chat_ids(tokenizer, topic, words=1 + i % 3) for i, topic in enumerate(TOPICS)]
    alone = []
    for ids in prompts:
        engine = Engine(model, tokenizer, num_blocks=64)
        rid = engine.add_request(ids, max_new_tokens=10)
        alone.append(engine.run()[rid].output_ids)
    engine = Engine(model, tokenizer, num_blocks=512, max_num_batched_tokens=256)  # chunked prefill too
    ids = [engine.add_request(p, max_new_tokens=10) for p in prompts]
    mixed = engine.run()
    assert [mixed[i].output_ids for i in ids] == alone
    assert engine.blocks.num_free == 512
    assert 0 <= engine.kv_stats.waste_at_peak <= engine.kv_stats.max_waste <= 0.5  # under one block per sequence
    assert engine.kv_stats.peak_blocks > 0


def test_padded_decode_steps_equal_unpadded_ones(smollm2_base):
    """Decode steps padded to batch buckets on static buffers (what CUDA captures as graphs) change nothing:
    batches of 5, 4, 3 and 1 sequences run in buckets of 8, 4 and 1, as requests finish at different lengths."""
    model, tokenizer = smollm2_base
    prompts = [chat_ids(tokenizer, topic) for topic in TOPICS[:5]]
    lengths = [12, 6, 9, 3, 12]
    outputs = []
    for graph_decode in (False, True):
        engine = Engine(model, tokenizer, num_blocks=128, graph_decode=graph_decode)
        assert (engine.decode_graphs is not None) == graph_decode
        engine.warmup()  # writes only into the scratch block
        ids = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
        done = engine.run()
        outputs.append([done[i].output_ids for i in ids])
        assert engine.blocks.num_free == 128
    assert outputs[0] == outputs[1]
    assert [len(o) for o in outputs[1]] == lengths


def test_decode_buckets():
    from flux_infer.generation.paged_graphs import decode_bucket

    assert [decode_bucket(n) for n in (1, 2, 3, 5, 16, 17, 32, 33, 256)] == [1, 2, 4, 8, 16, 32, 32, 48, 256]


def test_forced_preemption_gives_the_same_outputs(smollm2_base):
    model, tokenizer = smollm2_base
    prompts = [chat_ids(tokenizer, t) for t in TOPICS[:6]]
    roomy = Engine(model, tokenizer, num_blocks=256)
    roomy_ids = [roomy.add_request(p, max_new_tokens=24) for p in prompts]
    expected = [roomy.run()[r].output_ids for r in roomy_ids]
    tight = Engine(model, tokenizer, num_blocks=12, block_size=8)  # 96 slots for 6 x ~60 tokens
    ids = [tight.add_request(p, max_new_tokens=24) for p in prompts]
    done = tight.run()
    assert sum(done[i].metrics()["preemptions"] for i in ids) > 0
    assert [done[i].output_ids for i in ids] == expected
    assert all(done[i].finish_reason in ("stop", "length") for i in ids)
    assert tight.blocks.num_free == 12


def test_a_request_that_can_never_fit_finishes_with_a_reason(smollm2_base):
    model, tokenizer = smollm2_base
    engine = Engine(model, tokenizer, num_blocks=4, block_size=8)  # 32 slots
    too_long = engine.add_request(list(range(100, 140)), max_new_tokens=4)  # 40-token prompt
    grows_too_long = engine.add_request(chat_ids(tokenizer, "the sea")[:20], max_new_tokens=50,
                                        stop_token_ids=[])
    done = engine.run(max_steps=200)
    assert not engine.has_unfinished()
    assert done[too_long].finish_reason == "kv_cache_capacity"
    assert done[grows_too_long].finish_reason == "kv_cache_capacity"
    assert len(done[grows_too_long].output_ids) == 32 - 20 + 1  # every slot used; the last token needs none
    assert engine.blocks.num_free == 4


def test_abort_ten_of_a_hundred(smollm2_base):
    model, tokenizer = smollm2_base
    prompts = [chat_ids(tokenizer, TOPICS[i % len(TOPICS)], words=1 + i % 4) for i in range(100)]
    reference = Engine(model, tokenizer, num_blocks=2048)
    ref_ids = [reference.add_request(p, max_new_tokens=6) for p in prompts]
    ref = reference.run()
    engine = Engine(model, tokenizer, num_blocks=2048)
    start_free = engine.blocks.num_free
    ids = [engine.add_request(p, max_new_tokens=6) for p in prompts]
    engine.step()
    engine.step()
    aborted = ids[5::10]
    for rid in aborted:
        engine.abort(rid)
    done = engine.run()
    for rid, ref_id in zip(ids, ref_ids, strict=True):
        if rid in aborted:
            assert done[rid].finish_reason == "abort"
        else:
            assert done[rid].output_ids == ref[ref_id].output_ids
    assert engine.blocks.num_free == start_free


def test_streamed_text_is_whole_characters(smollm2_base):
    model, tokenizer = smollm2_base
    engine = Engine(model, tokenizer, num_blocks=128)
    prompt = chat_ids(tokenizer, "Japanese greetings; reply in Japanese with emoji 🎌")
    rid = engine.add_request(prompt, max_new_tokens=40)
    pieces = []
    while engine.has_unfinished():
        pieces += [o.new_text for o in engine.step() if o.request_id == rid]
    request = engine.requests[rid]
    assert "".join(pieces) == request.text == tokenizer.decode(request.output_ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_detokenizer_holds_back_split_characters(smollm2_base):
    tokenizer = smollm2_base[1]
    ids = tokenizer("é🎌ü", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == "é🎌ü" and all("\ufffd" not in p for p in pieces)


def test_stop_strings_are_cut_from_the_text(smollm2_base):
    model, tokenizer = smollm2_base
    engine = Engine(model, tokenizer, num_blocks=64)
    rid = engine.add_request(chat_ids(tokenizer, "counting: write the numbers 1 to 10"), max_new_tokens=40,
                             stop=["5"])
    request = engine.run()[rid]
    assert request.finish_reason == "stop" and "5" not in request.text and request.text


def test_bad_requests(smollm2_base):
    model, tokenizer = smollm2_base
    engine = Engine(model, None, num_blocks=8)
    with pytest.raises(InvalidConfigError, match="needs the engine's tokenizer"):
        engine.add_request("hello")
    with pytest.raises(InvalidConfigError, match="empty prompt"):
        engine.add_request([])
    with pytest.raises(InvalidConfigError, match="shorten the prompt"):
        engine.add_request([1] * model.config.max_position_embeddings)
    engine.add_request([1, 2, 3], request_id="x")
    with pytest.raises(InvalidConfigError, match="already in use"):
        engine.add_request([1, 2, 3], request_id="x")
    with pytest.raises(KeyError, match="unknown request id"):
        engine.abort("nope")
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)):
        with pytest.raises(InvalidConfigError, match="need max_new_tokens >= 1"):
            engine.add_request([1, 2], **bad)


def test_bad_engine_settings_and_unsupported_models(smollm2_base):
    model, _ = smollm2_base
    with pytest.raises(InvalidConfigError, match="must be positive"):
        Engine(model, None, num_blocks=8, block_size=0)
    with pytest.raises(InvalidConfigError, match="holds no block"):
        Engine(model, None, kv_cache_bytes=1000)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        Engine(tiny_model("mixtral"), None, num_blocks=8)


def test_int8_kv_cache_perplexity_within_one_percent(smollm2_base):
    from flux_infer.evaluation import cached_perplexity, evaluation_text, perplexity

    model, tokenizer = smollm2_base
    ids = tokenizer(evaluation_text(), return_tensors="pt")["input_ids"][0][:4096]
    fp = cached_perplexity(model, ids, int8_kv=False)
    assert abs(fp / perplexity(model, ids) - 1) < 1e-4  # the runner on the paged cache is the model itself
    assert cached_perplexity(model, ids, int8_kv=True) <= fp * 1.01


def test_int8_kv_cache_takes_about_half_the_memory_of_bf16():
    from flux_infer.generation.paged import PagedKVCache

    shape = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128)
    bf16 = PagedKVCache.bytes_per_block(dtype=torch.bfloat16, **shape)
    int8 = PagedKVCache.bytes_per_block(dtype=torch.bfloat16, int8=True, **shape)
    assert int8 / bf16 < 0.52  # 1.9x more sequences in the same memory
