"""The continuous-batching engine on a GPU (marked `cuda`): CUDA-graph decode steps, the Triton paged kernels
(prefill tiles, decode split-K, fused KV write) against the eager engine and against transformers' own greedy
generate, in float32 so the comparison is token for token."""

import pytest
import torch

import flux_infer
from flux_infer.engine import Engine

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda").eval()
    model.generation_config.eos_token_id = None
    flux_infer.optimize(model, level="O1")
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 90, (20,), generator=generator).tolist()
    prompts = [torch.randint(5, 1000, (n,), generator=generator).tolist() for n in lengths]
    new_tokens = torch.randint(1, 40, (20,), generator=generator).tolist()
    return model, prompts, new_tokens


def engine_outputs(model, prompts, new_tokens, **options):
    engine = Engine(model, None, num_blocks=512, max_num_batched_tokens=160, **options)
    ids = [engine.add_request(p, max_new_tokens=n, stop_token_ids=[]) for p, n in zip(prompts, new_tokens)]
    done = engine.run()
    assert engine.blocks.num_free == 512
    return [done[i].output_ids for i in ids]


def test_graph_decode_engine_matches_eager_engine_and_transformers(tiny_llama):
    model, prompts, new_tokens = tiny_llama
    graphed = engine_outputs(model, prompts, new_tokens)  # graphs are the default on CUDA
    eager = engine_outputs(model, prompts, new_tokens, graph_decode=False)
    assert graphed == eager
    expected = []
    for prompt, n in zip(prompts, new_tokens):
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        expected.append(out[0, len(prompt):].tolist())
    assert graphed == expected


def test_int8_kv_engine_graphs_match_eager(tiny_llama):
    model, prompts, new_tokens = tiny_llama
    assert engine_outputs(model, prompts, new_tokens, int8_kv=True) == engine_outputs(
        model, prompts, new_tokens, int8_kv=True, graph_decode=False)


@pytest.mark.parametrize("switches, layout", [(dict(paged_kv_cache=True), "paged"),
                                              (dict(quantize_kv_cache=True), "paged-int8")])
def test_model_generate_on_the_paged_caches(switches, layout):
    """model.generate on the paged (and INT8) pool through the Triton kernels, against transformers' own
    generate on the unoptimized model: a left-padded batch, prompts of different lengths."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to("cuda").eval()
    base.generation_config.eos_token_id = None
    model = copy.deepcopy(base)
    flux_infer.optimize(model, config=flux_infer.InferenceConfig(optimization_level="O1", **switches))
    assert {r.name: r.details for r in model.flux_report.applied}["fast_generate"]["kv_cache"] == layout
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 1000, (3, 40), generator=generator).cuda()
    mask = torch.ones_like(ids)
    mask[1, :17] = 0  # left padding
    mask[2, :33] = 0
    options = dict(attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    expected = base.generate(ids, **options)
    got = model.generate(ids, **options)
    if layout == "paged":
        assert torch.equal(got, expected)
    else:
        assert (got == expected).float().mean() > 0.9
