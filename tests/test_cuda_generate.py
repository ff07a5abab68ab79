"""O1 end to end on a GPU (marked `cuda`): SmolLM2 in bf16 against the unoptimized model, and the CUDA-graph
decode step against the same loop without graphs."""

import copy

import pytest
import torch

import flux_infer
from flux_infer import InferenceConfig

pytestmark = pytest.mark.cuda

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain why the sky is blue in one paragraph.", "Hi!"]


@pytest.fixture(scope="module")
def smollm2_cuda():
    model, tokenizer = flux_infer.load("smollm2-135m", device="cuda", dtype=torch.bfloat16)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to("cuda")
    return model, tokenizer, inputs


def run(model, inputs, tokenizer, n=32):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                          pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=True)


def test_o1_logits_close_and_top5_agree_with_the_unoptimized_model(smollm2_cuda):
    base, tokenizer, inputs = smollm2_cuda
    expected = run(base, inputs, tokenizer)
    fast = copy.deepcopy(base)
    flux_infer.optimize(fast, "O1")
    kernels_used = fast.flux_report.kernels
    assert kernels_used["rms_norm"] == "cuda" and kernels_used["cache_attention"] == "triton"
    got = run(fast, inputs, tokenizer)
    prompt = inputs["input_ids"].shape[1]
    compared = 0
    for row in range(len(PROMPTS)):
        for step, (mine, theirs) in enumerate(zip(got.logits, expected.logits)):
            if not torch.equal(got.sequences[row, prompt:prompt + step], expected.sequences[row, prompt:prompt + step]):
                break  # compare only while both saw the same history
            lp_mine, lp_theirs = mine[row].log_softmax(-1), theirs[row].log_softmax(-1)
            top_mine, top_theirs = lp_mine.topk(5).indices, lp_theirs.topk(5).indices
            assert set(top_mine.tolist()) == set(top_theirs.tolist()) or step > 0 and (
                lp_theirs[top_theirs[4]] - lp_theirs[top_mine].min() < 0.1)  # a 5th-place near-tie may swap
            assert (lp_mine[top_theirs] - lp_theirs[top_theirs]).abs().max() < 0.15
            compared += 1
    assert compared >= 4 * 16  # bf16 sequences agree for a good while


def test_cuda_graph_decode_equals_the_eager_loop(smollm2_cuda):
    base, tokenizer, inputs = smollm2_cuda
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    flux_infer.optimize(eager, config=InferenceConfig(optimization_level="O1", use_cuda_graphs=False))
    flux_infer.optimize(graphed, "O1")
    assert graphed.flux_report.applied[-1].details["cuda_graphs"] is True
    a, b = run(eager, inputs, tokenizer, 48), run(graphed, inputs, tokenizer, 48)
    assert torch.equal(a.sequences, b.sequences)
    again = run(graphed, inputs, tokenizer, 48)  # graphs and cache reused across calls
    assert torch.equal(again.sequences, b.sequences)
    single = {k: v[1:2] for k, v in inputs.items()}
    assert torch.equal(run(graphed, single, tokenizer, 20).sequences, run(eager, single, tokenizer, 20).sequences)
