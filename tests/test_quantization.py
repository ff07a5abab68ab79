"""Weight quantization on the CPU: quality on SmolLM2 against measured thresholds, per-layer SQNR, formats,
MoE experts, save/load, GPTQ and AWQ checkpoints, revert, and the errors a user can hit."""

import copy

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import flux_infer
from flux_infer import InferenceConfig
from flux_infer.errors import InvalidConfigError
from flux_infer.evaluation import evaluation_text, perplexity
from flux_infer.kernels.quant import dequantize_int4, int4_linear_ref, pack_int4, unpack_int4
from flux_infer.quantization.modules import QuantizedExperts, QuantizedLinear
from flux_infer.quantization.rtn import choose_group_size, int4_codes, sqnr_db

EVAL_TOKENS = 8192


def quantize(model, method, group=64, **extra):
    config = InferenceConfig(optimization_level="O0", quantization=method, quantization_group_size=group, **extra)
    return flux_infer.optimize(model, config=config)


@pytest.fixture(scope="module")
def eval_ids(smollm2_base):
    return smollm2_base[1](evaluation_text(), return_tensors="pt")["input_ids"][0][:EVAL_TOKENS]


@pytest.fixture(scope="module")
def fp32_ppl(smollm2_base, eval_ids):
    return perplexity(smollm2_base[0], eval_ids)


def test_int8_perplexity_within_half_a_percent(smollm2_base, eval_ids, fp32_ppl):
    model = quantize(copy.deepcopy(smollm2_base[0]), "int8")
    assert model.flux_report.applied[0].details["layers"] == 30 * 7
    assert perplexity(model, eval_ids) <= fp32_ppl * 1.005


def test_awq_closes_at_least_a_third_of_the_rtn_gap(smollm2_base, eval_ids, fp32_ppl):
    rtn = perplexity(quantize(copy.deepcopy(smollm2_base[0]), "int4"), eval_ids)
    awq_model = quantize(copy.deepcopy(smollm2_base[0]), "int4-awq")
    awq = perplexity(awq_model, eval_ids)
    assert rtn > fp32_ppl * 1.05  # round-to-nearest INT4 really hurts a 135M model
    assert awq <= rtn - (rtn - fp32_ppl) / 3, (fp32_ppl, rtn, awq)
    details = awq_model.flux_report.applied[0].details
    assert details["awq_groups"] == 30 * 3 and details["group_size"] == "64"


def test_every_layer_meets_its_sqnr_floor(smollm2_base):
    # Uniform quantization noise is step^2 / 12. Per-channel INT8 with a row max under 8x its RMS gives at least
    # 10 log10(3 * 127^2 / 8^2) = 34.8 dB; INT4 groups of 64 with a range under 6x the RMS give at least
    # 10 log10(12 * 15^2 / 6^2) = 18.8 dB.
    for name, module in smollm2_base[0].named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            w = module.weight
            assert sqnr_db(w, QuantizedLinear.from_weight(w, None, bits=8, group_size=None).dequantize()) > 34.8, name
            assert sqnr_db(w, QuantizedLinear.from_weight(w, None, bits=4, group_size=64).dequantize()) > 18.8, name


def test_group_size_that_does_not_divide_falls_back_and_is_reported(smollm2):
    model, _ = smollm2
    assert choose_group_size(576, 128) == 64 and choose_group_size(1536, 128) == 128
    assert choose_group_size(100, 128) is None
    quantize(model, "int4", group=128)
    details = model.flux_report.applied[0].details
    assert details["group_size"] == "64,128"  # 576-wide inputs get 64, the 1536-wide down_proj keeps 128
    assert model.model.layers[0].self_attn.q_proj.group_size == 64
    assert model.model.layers[0].mlp.down_proj.group_size == 128


def test_unsupported_group_size_is_a_clear_error():
    with pytest.raises(InvalidConfigError, match="quantization_group_size=96 is not supported; use one of"):
        InferenceConfig(quantization="int4", quantization_group_size=96)


def test_int4_format_pack_and_dequantize():
    codes = torch.randint(0, 16, (5, 64))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.int32))
    w = torch.randn(5, 64)
    codes, scales, mins = int4_codes(w, 32)
    deq = dequantize_int4(pack_int4(codes), scales, mins, 32, torch.float32)
    step = scales.repeat_interleave(32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()  # round to nearest: within half a step
    x = torch.randn(3, 64)
    assert torch.allclose(int4_linear_ref(x, pack_int4(codes), scales, mins, 32, None), x @ deq.T, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_quantized_ops(dtype):
    w = torch.randn(32, 64, dtype=dtype)
    int8 = QuantizedLinear.from_weight(w, torch.randn(32, dtype=dtype), bits=8, group_size=None)
    int4 = QuantizedLinear.from_weight(w, None, bits=4, group_size=32)
    x = torch.randn(2, 3, 64, dtype=dtype)
    torch.library.opcheck(torch.ops.flux.int8_linear.default, (x, int8.qweight, int8.scale, int8.bias))
    torch.library.opcheck(torch.ops.flux.int4_linear.default, (x, int4.qweight, int4.scales, int4.mins, 32, None))
    torch.library.opcheck(torch.ops.flux.quantized_gated_linear.default,
                          (x, int4.qweight, int4.scales, int4.mins, 32, None, "silu"))
    torch.library.opcheck(torch.ops.flux.quantized_gated_linear.default,
                          (x, int8.qweight, int8.scale, None, 0, int8.bias, "gelu_tanh"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_around_a_norm_are_the_layer_and_the_norm(dtype):
    """The split RMSNorm's references: h and normed exactly the add and the weight product, partials summing to
    sum(h^2), and the layer after the norm equal to the norm then the layer up to the rounding of the normalized
    activations (exactly in float32 up to reassociation)."""
    from flux_infer import kernels
    from flux_infer.kernels.quant import norm_partial_slots

    before = QuantizedLinear.from_weight(torch.randn(96, 64, dtype=dtype) / 8, torch.randn(96, dtype=dtype),
                                         bits=4, group_size=32)
    after = QuantizedLinear.from_weight(torch.randn(2 * 40, 96, dtype=dtype) / 10, None, bits=4, group_size=32)
    x, residual = torch.randn(2, 3, 64, dtype=dtype), torch.randn(2, 3, 96, dtype=dtype)
    weight = (torch.rand(96) + 0.5).to(dtype)
    normed, h, partials = before.add_norm(x, residual, weight)
    assert torch.equal(h, residual + before(x))
    assert torch.equal(normed, (h.float() * weight.float()).to(dtype))
    assert partials.shape == (2, 3, norm_partial_slots(96)) and partials.dtype == torch.float32
    torch.testing.assert_close(partials.sum(-1), h.float().pow(2).sum(-1))
    unfused = after(kernels.rms_norm(h.float(), weight.float(), 1e-5, 0.0).to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(after.norm_scaled(normed, partials, 1e-5), unfused, rtol=tol, atol=tol)
    gated = after.norm_scaled(normed, partials, 1e-5, "silu")
    assert torch.equal(gated, kernels.act_mul(*after.norm_scaled(normed, partials, 1e-5).chunk(2, -1), "silu"))
    args = (x, before.qweight, before.scales, before.mins, 32, before.bias)
    torch.library.opcheck(torch.ops.flux.int4_linear_add_norm.default, (*args, residual, weight))
    args = (normed, after.qweight, after.scales, after.mins, 32, None, partials, 1e-5)
    torch.library.opcheck(torch.ops.flux.int4_linear_norm_scaled.default, args)
    torch.library.opcheck(torch.ops.flux.int4_gated_linear_norm_scaled.default, (*args, "gelu_tanh"))


def test_int4_decode_without_norm_kernels_equals_the_unfused_loop(smollm2, monkeypatch):
    """SmolLM2 INT4 (float32, the CPU's references) generating with every norm but the first inside the quantized
    layers around it (generation/norm_fusion.py, forced on the CPU): the same greedy tokens as the loop with the
    norm layers, and the fused layers really ran (two add-norm layers per decoder layer per step)."""
    from flux_infer.generation.runner import DecoderRunner
    from flux_infer.kernels import quant

    model, tokenizer = smollm2
    monkeypatch.setattr(DecoderRunner, "fuse_norms", True)
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", quantization="int4",
                                                      quantization_group_size=64, quantize_lm_head=True,
                                                      use_flash_attention=False))
    report = model.flux_report
    assert next(r for r in report.applied if r.name == "fast_generate").details["norms_in_int4_layers"] is True
    assert report.kernels["int4_linear_add_norm"] == report.kernels["int4_gated_linear_norm_scaled"] == "reference"
    tokenizer.padding_side = "left"
    inputs = tokenizer(["The capital of France is", "Once upon a time, in a"], return_tensors="pt", padding=True)
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
                  max_new_tokens=12)
    reference, calls = quant.int4_linear_add_norm.reference, []
    monkeypatch.setattr(quant.int4_linear_add_norm, "reference", lambda *a: calls.append(1) or reference(*a))
    monkeypatch.setattr(DecoderRunner, "fuse_norms", False)
    unfused = model.generate(**inputs, **greedy)
    assert not calls
    monkeypatch.setattr(DecoderRunner, "fuse_norms", True)
    fused = model.generate(**inputs, **greedy)
    assert len(calls) == 2 * model.config.num_hidden_layers * 11  # the decode steps (the prefill has 14 rows)
    assert torch.equal(fused, unfused)


def test_revert_after_awq_restores_norms_and_linears_exactly(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(["Quantization should be revertible."], return_tensors="pt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    ids = tokenizer(evaluation_text()[-20000:], return_tensors="pt")["input_ids"][0][:1024].view(4, 256)
    quantize(model, "int4-awq", calibration_data=ids)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)
    flux_infer.revert(model)
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def test_save_and_load_round_trip_gives_identical_outputs(smollm2, tmp_path):
    model, tokenizer = smollm2
    quantize(model, "int4")
    inputs = tokenizer(["Saving a quantized model"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "flux-quantized.safetensors").is_file()
    with pytest.raises(flux_infer.errors.ModelLoadError, match="no usable tokenizer"):
        flux_infer.load(tmp_path, device="cpu")
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = flux_infer.load(tmp_path, device="cpu")
    assert isinstance(loaded.model.layers[3].mlp.gate_proj, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
    plan = flux_infer.check(loaded, "O2")  # already quantized: nothing for the quantization plugin to do
    assert "already quantized" in dict((s.name, s.reason) for s in plan.skipped)["quantization"]


@pytest.mark.parametrize("bits", [8, 4])
def test_moe_experts_are_quantized(bits):
    model = tiny_model("mixtral")
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    quantize(model, "int8" if bits == 8 else "int4", group=32)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts) and model.flux_report.applied[0].details["expert_blocks"] == 2
    with torch.no_grad():
        got = model(**inputs).logits
    assert sqnr_db(expected, got) > (30 if bits == 8 else 12)


def test_lm_head_stays_unless_asked(smollm2):
    model, _ = smollm2
    quantize(model, "int8", quantize_lm_head=True)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings always stay


def test_bad_calibration_data_is_a_clear_error(smollm2):
    model, _ = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(flux_infer.errors.PluginApplyError, match="calibration_data as a tensor must be token ids"):
        quantize(model, "int4-awq", calibration_data=torch.randn(4, 8))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# ---- GPTQ / AWQ checkpoints ----------------------------------------------------------------------------------
# Packers written from the published layouts (independently of flux's unpackers):
# GPTQ: qweight [K/8, N], input channel k in nibble k % 8 of row k // 8; qzeros [G, N/8], output column n in
#       nibble n % 8; v1 checkpoints store zero - 1. AWQ (GEMM): qweight [K, N/8] and qzeros [G, N/8], output
#       column 8c + order[i] in nibble i, order = 0 2 4 6 1 3 5 7; zeros stored as is.
def _pack(values, along_rows, order=range(8)):
    v = values.to(torch.int64)
    out = torch.zeros((v.shape[0] // 8, v.shape[1]) if along_rows else (v.shape[0], v.shape[1] // 8),
                      dtype=torch.int64)
    for i, src in enumerate(order):
        part = v[src::8, :] if along_rows else v[:, src::8]
        out |= part << (4 * i)
    return out.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else (
        (out + 2**31) % 2**32 - 2**31).to(torch.int32)


def _write_packed_checkpoint(model, tokenizer, path, method, group=64):
    """Quantize SmolLM2's decoder linears with RTN and write them in ``method``'s checkpoint layout."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        codes, scales, mins = int4_codes(module.weight, group)  # [N, K], [N, G]
        zeros = torch.round(-mins / scales).to(torch.int64)  # mins = -zero * scale
        del state[f"{name}.weight"]
        if method == "gptq":
            state[f"{name}.qweight"] = _pack(codes.T, along_rows=True)
            state[f"{name}.qzeros"] = _pack(zeros.T - 1, along_rows=False)
            state[f"{name}.g_idx"] = (torch.arange(module.in_features) // group).to(torch.int32)
        else:
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            state[f"{name}.qweight"] = _pack(codes.T, along_rows=False, order=order)
            state[f"{name}.qzeros"] = _pack(zeros.T, along_rows=False, order=order)
        state[f"{name}.scales"] = scales.T.contiguous().to(torch.float16)
    save_file(state, str(path / "model.safetensors"))
    config = copy.deepcopy(model.config)
    config.quantization_config = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                   "sym": False, "checkpoint_format": "gptq"} if method == "gptq" else
                                  {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                   "version": "gemm"})
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_and_awq_checkpoints_load_onto_flux_kernels(smollm2_base, tmp_path, method):
    base, tokenizer = smollm2_base
    _write_packed_checkpoint(base, tokenizer, tmp_path, method)
    loaded, _ = flux_infer.load(tmp_path, device="cpu", dtype=torch.float32)
    layer = loaded.model.layers[5].self_attn.k_proj
    assert isinstance(layer, QuantizedLinear) and layer.group_size == 64
    # the same codes through flux's own quantizer (fp16 scales, as the checkpoint stores them)
    expected = copy.deepcopy(base)
    quantize(expected, "int4")
    original = base.model.layers[5].self_attn.k_proj.weight
    torch.testing.assert_close(layer.dequantize(), expected.model.layers[5].self_attn.k_proj.dequantize(),
                               rtol=2e-3, atol=2e-3)
    assert sqnr_db(original, layer.dequantize()) > 18.8
    inputs = tokenizer(["The checkpoint"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected(**inputs).logits, rtol=0.05, atol=0.05)


def test_gptq_act_order_checkpoint(smollm2_base, tmp_path):
    """A GPTQ checkpoint whose g_idx groups permuted input channels (desc_act): regrouped at load time."""
    from safetensors.torch import load_file, save_file

    base, tokenizer = smollm2_base
    _write_packed_checkpoint(base, tokenizer, tmp_path, "gptq")
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    module = base.get_submodule(name)
    perm = torch.randperm(module.in_features, generator=torch.Generator().manual_seed(0))
    codes, scales, mins = int4_codes(module.weight[:, perm], 64)  # channel perm[j] lands in group j // 64
    g_idx = torch.empty(module.in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(module.in_features) // 64).to(torch.int32)
    unpermuted = torch.empty_like(codes).index_copy_(1, perm, codes)  # row-major by original channel again
    state[f"{name}.qweight"] = _pack(unpermuted.T, along_rows=True)
    state[f"{name}.qzeros"] = _pack(torch.round(-mins / scales).to(torch.int64).T - 1, along_rows=False)
    state[f"{name}.scales"] = scales.T.contiguous().to(torch.float16)
    state[f"{name}.g_idx"] = g_idx
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded, _ = flux_infer.load(tmp_path, device="cpu", dtype=torch.float32)
    layer = loaded.get_submodule(name)
    assert layer.input_perm is not None
    assert sqnr_db(module.weight, layer.dequantize()) > 18.8
    x = torch.randn(2, module.in_features)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T, rtol=1e-4, atol=1e-4)
