"""The fragment-layout INT4 kernel (csrc/quant_frag.cu) against its references, and the int4_fragments plugin end to
end (GPU only: marked `cuda`). Tolerances as tests/test_cuda_kernels.py: within twice the error of the PyTorch
reference against float64; bit for bit where the same sums are rounded the same way."""

import copy

import pytest
import torch

import flux_infer
from flux_infer import InferenceConfig, kernels
from flux_infer.kernels import cuda as cuda_kernels
from flux_infer.kernels import quant_frag
from flux_infer.plugins import int4_fragments
from flux_infer.quantization.modules import QuantizedLinear

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_kernels.load(), cuda_kernels.status()


def fragment_case(n, k, bias=True, seed=0):
    torch.manual_seed(seed)
    w = (torch.randn(n, k, device="cuda") / k**0.5).bfloat16()
    b = torch.randn(n, device="cuda").bfloat16() if bias else None
    checkpoint = QuantizedLinear.from_weight(w, b, bits=4, group_size=128)
    layer = copy.deepcopy(checkpoint)
    layer.set_fragments(True)
    return checkpoint, layer


def rel_err(x, truth):
    return ((x.double() - truth).norm() / truth.norm()).item()


def assert_close_to_float64(out, reference, truth):
    assert out.shape == reference.shape
    assert rel_err(out, truth) <= 2 * rel_err(reference, truth) + 2**-8


def kernel(layer, x, activation=-1, partials=None, eps=0.0, residual=None, norm_weight=None, warps=0, ksplit=0):
    return cuda_kernels._state["module"].quant_frag(x, layer.qweight, layer.scales, layer.mins, layer.bias, activation,
                                                    partials, eps, residual, norm_weight,
                                                    quant_frag.counters(x.device), warps, ksplit)


# (warps, K split); 0: the launcher's choice; -8 / -16: the kernel for up to 8 rows (quant_frag_rows.cuh)
PLANS = [(0, 0), (2, 1), (2, 3), (2, 8), (8, 1), (8, 4), (-8, 1), (-16, 1)]


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17, 40])
@pytest.mark.parametrize("n, k", [(1024, 1024), (512, 2048), (4096, 512), (256, 14336)])
@pytest.mark.parametrize("plan", PLANS)
def test_fragment_kernel_against_float64(rows, n, k, plan):
    if (plan[0] == 8 and n % 256) or plan[1] > k // 128 or (plan[0] < 0 and rows > 8):
        pytest.skip("8-warp blocks take 256 outputs; a K split of at most K / 128; the few-rows kernel 8 rows")
    checkpoint, layer = fragment_case(n, k, bias=rows % 2 == 1)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    out = kernel(layer, x, warps=plan[0], ksplit=plan[1])[0]
    bias = checkpoint.bias.double() if checkpoint.bias is not None else None
    truth = torch.nn.functional.linear(x.double(), checkpoint.dequantize().double(), bias)
    reference = kernels.int4_linear_ref(x, checkpoint.qweight, checkpoint.scales, checkpoint.mins, 128, checkpoint.bias)
    assert_close_to_float64(out, reference, truth)


@pytest.mark.parametrize("rows", [1, 5, 16, 48, 64, 200])  # from 49 rows: cuBLAS on the dequantized weight
def test_the_op_serves_every_row_count(rows):
    checkpoint, layer = fragment_case(1024, 1024)
    assert kernels.implementation("int4f_linear", "cuda") == "cuda"
    x = torch.randn(rows, 1024, device="cuda").bfloat16()
    truth = torch.nn.functional.linear(x.double(), checkpoint.dequantize().double(), checkpoint.bias.double())
    assert_close_to_float64(layer(x), checkpoint(x), truth)


@pytest.mark.parametrize("rows", [1, 7, 16, 33])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("half, k", [(512, 1024), (2048, 4096)])
def test_gated_is_the_plain_layers_halves_through_act_mul_bit_for_bit(rows, activation, half, k):
    """Gated blocks pair gate and up tiles; each tile's sums are the plain launch's (same K split), rounded as
    the layer and act_mul round them."""
    _, layer = fragment_case(2 * half, k, bias=rows % 2 == 0)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    gate, up = layer(x).chunk(2, dim=-1)
    assert torch.equal(layer.gated(x, activation), kernels.act_mul(gate, up, activation))


@pytest.mark.parametrize("rows", [1, 4, 8, 16, 40])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("n, k", [(1024, 1024), (4096, 512)])
@pytest.mark.parametrize("slots", [37, 128, 600])  # staged (4- or 16-byte copies) up to 512, read at the end above
def test_norm_scaled_against_float64(rows, activation, n, k, slots):
    checkpoint, layer = fragment_case(n, k, bias=rows % 2 == 0)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    partials, eps = torch.rand(rows, slots, device="cuda") * k / 20 * 37 / slots, 1e-5
    out = layer.norm_scaled(x, partials, eps, activation)
    scale = torch.rsqrt(partials.double().sum(-1, keepdim=True) / k + eps)
    full = torch.nn.functional.linear(x.double(), checkpoint.dequantize().double()) * scale
    if checkpoint.bias is not None:
        full = full + checkpoint.bias.double()
    truth = full if activation is None else kernels.act_mul_ref(*full.chunk(2, dim=-1), activation)
    reference = quant_frag.int4f_linear_ref(x, layer.qweight, layer.scales, layer.mins, layer.bias,
                                            activation or "", partials, eps)
    assert_close_to_float64(out, reference, truth)
    if activation:
        gate, up = layer.norm_scaled(x, partials, eps).chunk(2, dim=-1)
        assert torch.equal(out, kernels.act_mul(gate, up, activation))


@pytest.mark.parametrize("rows", [1, 16, 40])
def test_norm_scaled_partials_at_any_alignment(rows):
    """Partial sums that do not start on 16 bytes (the kernel's copies need it: the host copies them first) give
    the same results bit for bit."""
    _, layer = fragment_case(1024, 1024)
    x = torch.randn(rows, 1024, device="cuda").bfloat16()
    storage = torch.rand(rows * 128 + 1, device="cuda") * 50
    aligned, shifted = storage[:-1].view(rows, 128), storage[1:].view(rows, 128)
    assert shifted.data_ptr() % 16 != 0
    assert torch.equal(layer.norm_scaled(x, shifted, 1e-5, "silu"), layer.norm_scaled(x, shifted.clone(), 1e-5, "silu"))
    assert torch.equal(layer.norm_scaled(x, aligned, 1e-5), layer.norm_scaled(x, aligned.clone(), 1e-5))


@pytest.mark.parametrize("rows", [1, 3, 8, 16, 40])
@pytest.mark.parametrize("n, k", [(1024, 1024), (576, 1536), (4096, 14336)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "odd"])  # odd: the kernel's bf16 pairs need a copy
@pytest.mark.parametrize("ksplit", [0, 1, 4])
def test_add_norm_is_the_layer_and_the_add_bit_for_bit(rows, n, k, layout, ksplit, monkeypatch):
    """With the plain layer's K split (the same sums): h = layer(x) + residual bit for bit; with each call's own
    plan (ksplit 0: add-norm splits K less than the plain layer where it has many) within their roundings."""
    _, layer = fragment_case(n, k, bias=rows % 2 == 1)
    if ksplit:
        for epilogue in ("plain", "add_norm"):
            monkeypatch.setitem(cuda_kernels.FRAG_PLANS, (n, k, epilogue), (2, ksplit))
    x = torch.randn(rows, k, device="cuda").bfloat16()
    pad = {"contiguous": 0, "strided": 8, "odd": 1}[layout]
    residual = torch.randn(rows, n + pad, device="cuda").bfloat16()[:, pad:]
    weight = (torch.rand(n + pad, device="cuda") + 0.5).bfloat16()[pad:]
    normed, h, partials = layer.add_norm(x, residual, weight)
    y = layer(x)
    if ksplit:
        assert torch.equal(h, y + residual)
    else:  # the sums in another order: the layer's output one rounding apart (its ulp), then each add's (h's ulp)
        expected = y + residual
        error = (h.float() - expected.float()).abs()
        assert (error <= 2**-7 * (y.float().abs() + h.float().abs() + expected.float().abs())).all(), error.max()
    assert torch.equal(normed, (h.float() * weight.float()).bfloat16())
    assert partials.shape == (rows, n // 32) and partials.dtype == torch.float32
    torch.testing.assert_close(partials, h.float().pow(2).view(rows, n // 32, 32).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 16, 40])
@pytest.mark.parametrize("activation", [-1, 0])
def test_every_launch_form_gives_the_same_sums_bit_for_bit(rows, activation):
    """Plain, programmatic with an early trigger (the default for small layers above one row) and programmatic with
    a late one (set_frag_launch's forms): only the overlap with the kernels around a call changes, never its sums."""
    _, layer = fragment_case(512, 14336)  # a K split: the counters and the workspace are used
    x = torch.randn(rows, 14336, device="cuda").bfloat16()
    outs = []
    try:
        for launch in [(0, False, True), (1 << 30, False, True), (1 << 30, False, False), (0, True, True)]:
            cuda_kernels.set_frag_launch(*launch)
            outs.append(kernel(layer, x, activation)[0])
    finally:
        cuda_kernels.set_frag_launch()
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    assert not quant_frag.counters(x.device).any()


def test_dequantize_is_the_checkpoint_layouts_bit_for_bit():
    checkpoint, layer = fragment_case(1024, 2048)
    dense = cuda_kernels._state["module"].frag_dequantize(layer.qweight, layer.scales, layer.mins)
    assert torch.equal(dense, checkpoint.dequantize())


def test_the_kernel_refuses_what_it_cannot_run():
    _, layer = fragment_case(1024, 1024)
    x = torch.randn(2, 1024, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="2 warps"):
        kernel(layer, x, activation=0, warps=8)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        kernel(layer, torch.randn(9, 1024, device="cuda").bfloat16(), warps=-8)
    with pytest.raises(RuntimeError, match="no K split"):
        kernel(layer, x, warps=-16, ksplit=2)
    with pytest.raises(RuntimeError, match="x must be contiguous bf16"):
        kernel(layer, x.half())
    torch.library.opcheck(torch.ops.flux.int4f_linear.default,
                          (x, layer.qweight, layer.scales, layer.mins, layer.bias, "silu", None, 0.0))


def test_a_decode_step_in_a_cuda_graph_leaves_the_counters_at_zero():
    _, layer = fragment_case(256, 14336)  # a K split (above 8 rows): the counters are used
    x = torch.randn(12, 14336, device="cuda").bfloat16()
    eager = layer(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(3):
        graph.replay()
        assert torch.equal(out, eager)
    assert not quant_frag.counters(x.device).any()


INT4_SETTINGS = dict(optimization_level="O1", quantization="int4", quantization_group_size=128, quantize_lm_head=True)


def small_llama():
    """A small random Llama in bf16 on the GPU (the same weights at every call)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=4096,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()


def greedy(model, ids, new_tokens=12):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("roles", [int4_fragments.ROLES, ("gate_up", "down", "lm_head")])
def test_int4_decode_with_the_wide_layers_in_the_fragment_layout(roles, monkeypatch):
    """A small random Llama at INT4 group 128 with lm_head quantized: the plugin (on by default with INT4) switches
    its layers (by default q/k/v, o, gate/up, down and lm_head; or only some) to the fragment layout, the state_dict
    stays the checkpoint layout's, and greedy decoding (4 rows: the kernel for up to 8 rows and the norm pieces; 16
    rows by batching the prompts 4 times: the norm pieces too when every layer around a norm switched, else the norm
    kernels) matches the same model with the plugin excluded within twice what bf16 changes in the unquantized
    model's logits (against float32), up to the first near tie; revert restores it."""
    model = small_llama()
    prompts = torch.randint(3, 4096, (4, 20), device="cuda")
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        bf16_error = rel(model(input_ids=prompts).logits.float(),
                         copy.deepcopy(model).float()(input_ids=prompts).logits)
    plain = copy.deepcopy(model)
    monkeypatch.setattr(int4_fragments, "ROLES", roles)
    flux_infer.optimize(model, config=InferenceConfig(**INT4_SETTINGS))  # on by default with INT4 on CUDA
    switched = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.fragments]
    # per layer gate_proj and up_proj (views of the fused layer), down, q_proj, k_proj, v_proj (views too), o_proj
    per_layer = {"gate_up": 2, "down": 1, "qkv": 3, "o": 1}
    assert len(switched) == 2 * sum(per_layer.get(role, 0) for role in roles) + ("lm_head" in roles)
    flux_infer.optimize(plain, config=InferenceConfig(**INT4_SETTINGS, exclude=["int4_fragments"]))
    assert not any(isinstance(m, QuantizedLinear) and m.fragments for m in plain.modules())
    state, plain_state = model.state_dict(), plain.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain_state.items())
    kernel, add_norm_rows = quant_frag.int4f_linear_add_norm._kernels["cuda"], []  # the fragment add-norm calls
    monkeypatch.setitem(quant_frag.int4f_linear_add_norm._kernels, "cuda",
                        (lambda x, *a: add_norm_rows.append(x.numel() // x.shape[-1]) or kernel[0](x, *a), kernel[1]))
    for copies in (1, 4):
        ids = prompts.repeat(copies, 1)
        runs = [greedy(m, ids) for m in (model, plain)]
        same = []
        for row in range(len(ids)):
            for step, (a, b) in enumerate(zip(runs[0].logits, runs[1].logits, strict=True)):
                a, b = a[row].float(), b[row].float()
                mine, theirs = runs[0].sequences[row, 20 + step], runs[1].sequences[row, 20 + step]
                if mine != theirs:
                    assert b[theirs] - b[mine] <= (a - b).abs().max(), (copies, row, step)
                    break
                same.append((a, b))
        got, want = (torch.stack(x) for x in zip(*same, strict=True))
        assert rel(got, want) <= 2 * bf16_error, (copies, rel(got, want), bf16_error)
    assert 4 in add_norm_rows  # down's add-norm at 4 rows (o's too when it switched)
    assert (16 in add_norm_rows) == all(role in roles for role in ("qkv", "o", "gate_up", "down", "lm_head"))
    flux_infer.revert(model)
    assert not any(isinstance(m, QuantizedLinear) and m.fragments for m in model.modules())


def test_an_early_trigger_up_to_16_rows_changes_no_result():
    """set_early_trigger(True, 16) only moves where each kernel over up to 16 rows lets the next one launch (from its
    start instead of after its main loop): a 16-row greedy decode through the fragment layers, its graphs captured
    with the setting, gives the default's logits bit for bit."""
    model = small_llama()
    ids = torch.randint(3, 4096, (16, 20), device="cuda")
    early_model = copy.deepcopy(model)
    config = InferenceConfig(**INT4_SETTINGS, plugins=["int4_fragments"])
    flux_infer.optimize(model, config=config)
    default = greedy(model, ids, new_tokens=8)
    try:
        cuda_kernels.set_early_trigger(True, 16)
        assert cuda_kernels.early_trigger_rows() == 16 and cuda_kernels.trigger_early(16)
        assert not cuda_kernels.trigger_early(17)
        flux_infer.optimize(early_model, config=config)  # a fresh model: its decode graphs captured with the setting
        early = greedy(early_model, ids, new_tokens=8)
    finally:
        cuda_kernels.set_early_trigger(True)
    assert cuda_kernels.early_trigger_rows() == 1 and not cuda_kernels.trigger_early(2)
    assert torch.equal(early.sequences, default.sequences)
    assert all(torch.equal(a, b) for a, b in zip(early.logits, default.logits, strict=True))
    with pytest.raises(ValueError, match="max_rows must be at least 1"):
        cuda_kernels.set_early_trigger(True, 0)
