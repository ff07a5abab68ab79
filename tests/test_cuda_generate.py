"""O1 end to end on a GPU (marked `cuda`): SmolLM2 in bf16 against the unoptimized model, and the CUDA-graph
decode step against the same loop without graphs.

The tolerance is derived, not tuned: along the sequence flux generated, flux's bf16 log-probabilities may be at
most twice as far from a float32 run of the unoptimized model as transformers' own bf16 run is.
"""

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


def teacher_forced_logprobs(model, sequences, prompt_mask, steps):
    """Log-probabilities of every generated position, from one forward over the whole sequence."""
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1]:])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=mask).logits.float()
    start = prompt_mask.shape[1] - 1
    return logits[:, start:start + steps].log_softmax(-1)


def test_o1_logprobs_within_twice_the_bf16_error_and_top5_agree(smollm2_cuda):
    base, tokenizer, inputs = smollm2_cuda
    fast = copy.deepcopy(base)
    flux_infer.optimize(fast, "O1")
    kernels_used = fast.flux_report.kernels
    assert kernels_used["rms_norm"] == "cuda" and kernels_used["cache_attention"] == "triton"
    assert kernels_used["linear"] == "cuda"
    got = run(fast, inputs, tokenizer)
    steps = len(got.logits)
    flux_lp = torch.stack(got.logits, dim=1).float().log_softmax(-1)  # [B, steps, V]
    truth = teacher_forced_logprobs(copy.deepcopy(base).float(), got.sequences, inputs["attention_mask"], steps)
    hf_lp = teacher_forced_logprobs(base, got.sequences, inputs["attention_mask"], steps)
    alive = got.sequences[:, -steps:] != tokenizer.pad_token_id  # positions before each row ended
    alive[:, 0] = True
    top5 = truth.topk(5, dim=-1).indices
    err = lambda lp: (lp.gather(-1, top5) - truth.gather(-1, top5)).abs().amax(-1)[alive]  # noqa: E731
    flux_err, hf_err = err(flux_lp), err(hf_lp)
    assert flux_err.mean() <= 2 * hf_err.mean() + 1e-3, (flux_err.mean(), hf_err.mean())
    agree = lambda lp: (lp.topk(5, dim=-1).indices.sort(-1).values == top5.sort(-1).values).all(-1)[alive]  # noqa
    assert agree(flux_lp).float().mean() >= agree(hf_lp).float().mean() - 0.05
    assert (flux_lp.argmax(-1) == truth.argmax(-1))[alive].float().mean() >= 0.95


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


def test_greedy_steps_on_the_device_equal_the_step_by_step_loop(smollm2_cuda, monkeypatch):
    """Plain greedy decoding selects its tokens inside the captured graph (GREEDY_GRAPH_STEPS steps per graph, then
    one-step graphs): the same sequences as the loop that selects on the host each step (forced here by asking for
    the scores), with EOS stops, a length that is not a multiple of the graph's steps, padding rows of the batch
    bucket, and graphs reused across calls and EOS settings."""
    from flux_infer.generation import decoder as decoder_module

    advance, ran = decoder_module.GreedyDecode.advance, []
    monkeypatch.setattr(decoder_module.GreedyDecode, "advance",
                        lambda self, limit: ran.append((bool(self.graphs), advance(self, limit))) or ran[-1][1])
    base, tokenizer, inputs = smollm2_cuda
    model = copy.deepcopy(base)
    flux_infer.optimize(model, "O1")
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    three = {k: v[:3] for k, v in inputs.items()}  # a batch of 3 in the bucket of 4
    for batch_inputs in (inputs, three, {k: v[1:2] for k, v in inputs.items()}):
        for options in (dict(max_new_tokens=45), dict(max_new_tokens=37, eos_token_id=[tokenizer.eos_token_id, 28]),
                        dict(max_new_tokens=9, eos_token_id=None)):
            fast = model.generate(**batch_inputs, **greedy, **options)
            step_by_step = model.generate(**batch_inputs, **greedy, **options, return_dict_in_generate=True,
                                          output_scores=True).sequences
            assert torch.equal(fast, step_by_step), options
    assert {steps for graphed, steps in ran if graphed} == {1, decoder_module.GREEDY_GRAPH_STEPS}


def test_revert_on_cuda_restores_weights(smollm2_cuda):
    base, tokenizer, inputs = smollm2_cuda
    model = copy.deepcopy(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flux_infer.optimize(model, "O1")
    assert model.flux_report.applied[2].name == "fuse_projections"
    run(model, inputs, tokenizer, 8)
    flux_infer.revert(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert not hasattr(model.model.layers[0].self_attn, "flux_fused_qkv")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_on_the_tensor_core_kernels_matches_the_reference_path(smollm2_cuda, quantization):
    """A forward of 4 x 8 tokens (32 rows: every linear layer on the 1-32 row tensor-core kernel, INT4 group 64)
    against the same quantized model with the reference quantized linear (dequantize, F.linear), and greedy
    decoding (1-4 rows) the same way. The logits may differ by at most twice what bf16 itself changes in the
    unquantized model's logits (against float32), on the same tokens."""
    from flux_infer.kernels import quant

    base, tokenizer, inputs = smollm2_cuda
    ids = inputs["input_ids"][:, -8:]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        bf16_error = rel(base(input_ids=ids).logits.float(), copy.deepcopy(base).float()(input_ids=ids).logits)
    config = InferenceConfig(optimization_level="O1", quantization=quantization, quantization_group_size=64)
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    flux_infer.optimize(fast, config=config)
    ops = [quant.int8_linear] if quantization == "int8" else [
        quant.int4_linear, quant.int4_linear_add_norm, quant.int4_linear_norm_scaled,
        quant.int4_gated_linear_norm_scaled]  # INT4 decode steps run the layers around the norms too
    assert all(op.implementation("cuda") == "cuda" for op in ops)
    saved = [op._kernels.pop("cuda") for op in ops]
    try:
        flux_infer.optimize(slow, config=config)
        with torch.no_grad():
            ref = slow(input_ids=ids).logits.float()
        ref_run = run(slow, inputs, tokenizer, 16)
    finally:
        for op, kernel in zip(ops, saved, strict=True):
            op._kernels["cuda"] = kernel
    with torch.no_grad():
        got = fast(input_ids=ids).logits.float()
    got_run = run(fast, inputs, tokenizer, 16)
    diff = rel(got, ref)
    assert diff <= 2 * bf16_error, (diff, bf16_error)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    same = (got_run.sequences == ref_run.sequences)[:, -16:].float().mean().item()
    assert same >= 0.9, same


def test_int4_decode_without_norm_kernels_matches_the_unfused_step(smollm2_cuda, monkeypatch):
    """INT4 decode steps (4 rows) with every norm but the first inside the quantized layers around it
    (generation/norm_fusion.py) against the same model's steps with the norm kernels: the logits within twice what bf16 itself changes in the model's logits at every step both runs saw the same tokens,
    and where the greedy paths part, a near tie (the rounding differs, so a flip at a tie is expected; with it the
    rest of a row differs). The fused step really ran: two add-norm layers per decoder layer per step."""
    from flux_infer.generation.runner import DecoderRunner
    from flux_infer.kernels import quant

    base, tokenizer, inputs = smollm2_cuda
    ids = inputs["input_ids"][:, -8:]
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        bf16_error = rel(base(input_ids=ids).logits.float(), copy.deepcopy(base).float()(input_ids=ids).logits)
    config = InferenceConfig(optimization_level="O1", quantization="int4", quantization_group_size=64,
                             quantize_lm_head=True)
    models = [copy.deepcopy(base), copy.deepcopy(base)]  # each captures its decode graphs under its own setting
    for model in models:
        flux_infer.optimize(model, config=config)
    kernel, calls = quant.int4_linear_add_norm._kernels["cuda"], []
    monkeypatch.setitem(quant.int4_linear_add_norm._kernels, "cuda",
                        (lambda *a: calls.append(1) or kernel[0](*a), kernel[1]))
    monkeypatch.setattr(DecoderRunner, "fuse_norms", False)
    unfused = run(models[0], inputs, tokenizer, 24)
    assert not calls
    monkeypatch.setattr(DecoderRunner, "fuse_norms", None)  # the default: on CUDA
    fused = run(models[1], inputs, tokenizer, 24)
    layers = base.config.num_hidden_layers
    assert len(calls) >= 2 * layers and len(calls) % (2 * layers) == 0
    assert torch.equal(fused.logits[0], unfused.logits[0])  # the prefill (> 8 rows) runs the norm kernels
    prompt = inputs["input_ids"].shape[1]
    same_input = []
    for row in range(len(fused.sequences)):
        for step, (a, b) in enumerate(zip(fused.logits, unfused.logits, strict=True)):
            a, b = a[row].float(), b[row].float()
            mine, theirs = fused.sequences[row, prompt + step], unfused.sequences[row, prompt + step]
            if mine != theirs:  # greedy paths part only at a near tie: within what the two steps' logits differ by
                assert b[theirs] - b[mine] <= (a - b).abs().max(), (row, step)
                break
            same_input.append((a, b))
    fused_logits, unfused_logits = (torch.stack(x) for x in zip(*same_input, strict=True))
    assert rel(fused_logits, unfused_logits) <= 2 * bf16_error  # every step that saw the same tokens
