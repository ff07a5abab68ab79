"""The custom ops and their references on the CPU: same arithmetic as transformers, opcheck, odd shapes."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from flux_infer import kernels
from flux_infer.kernels import cuda as cuda_kernels

SHAPES = [(1, 576), (3, 7, 64), (5, 769), (2, 1, 5125)]


def _weight(dim, gemma=False):
    g = torch.Generator().manual_seed(dim)
    return torch.randn(dim, generator=g) * 0.2 + (0.0 if gemma else 1.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama_and_gemma_modules_exactly(shape, dtype):
    x = torch.randn(shape).to(dtype)
    llama, gemma = LlamaRMSNorm(shape[-1], eps=1e-5), GemmaRMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        llama.weight.copy_(_weight(shape[-1]))
        gemma.weight.copy_(_weight(shape[-1], gemma=True))
        llama, gemma = llama.to(dtype), gemma.to(dtype)
        assert torch.equal(kernels.rms_norm(x, llama.weight, 1e-5, 0.0), llama(x))
        assert torch.equal(kernels.rms_norm(x, gemma.weight, 1e-6, 1.0), gemma(x))


def test_rms_norm_on_a_non_contiguous_view():
    base = torch.randn(6, 2 * 769)
    x = base[:, ::2]
    assert not x.is_contiguous()
    w = _weight(769)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6, 0.0), kernels.rms_norm_ref(x.contiguous(), w, 1e-6, 0.0))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_act_mul_matches_transformers_activations(activation):
    from transformers.activations import ACT2FN

    act = ACT2FN["silu" if activation == "silu" else "gelu_pytorch_tanh"]
    fused = torch.randn(4, 3, 2 * 1537)
    gate, up = fused.chunk(2, dim=-1)  # strided views, as the Phi-3 fused projection produces
    assert torch.equal(kernels.act_mul(gate, up, activation), act(gate) * up)


def test_act_mul_rejects_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        kernels.act_mul_ref(torch.ones(2), torch.ones(2), "relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x = torch.randn(3, 5, 64, dtype=dtype)
    torch.library.opcheck(torch.ops.flux.rms_norm.default, (x, _weight(64).to(dtype), 1e-6, 0.0))
    torch.library.opcheck(torch.ops.flux.rms_norm.default, (x, _weight(64).to(dtype), 1e-6, 1.0))
    gate, up = torch.randn(2, 2, 96, dtype=dtype).chunk(2, dim=-1)
    torch.library.opcheck(torch.ops.flux.act_mul.default, (gate, up, "silu"))


def test_ops_trace_under_torch_compile():
    w = _weight(64)

    def f(x):
        g, u = x.chunk(2, dim=-1)
        return kernels.rms_norm(kernels.act_mul(g, u, "silu"), w[:32], 1e-6, 0.0)

    x = torch.randn(4, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def test_implementation_defaults_to_reference_on_cpu():
    assert kernels.implementation("rms_norm", "cpu") == "reference"


def test_rotary_cache_attention_reference_is_the_two_step_path():
    """The one-launch decode op's contract: the caches as rotary_cache_write_ leaves them, q and k untouched, and
    the attention of the rotated q over them (what StaticKVCache runs on CPU in two steps)."""
    torch.manual_seed(0)
    heads, kv_heads, dim, slots = 6, 2, 32, 24
    qkv = torch.randn(2, 1, heads + 2 * kv_heads, dim)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    table = torch.randn(slots, dim)
    positions, where = torch.tensor([[9], [4]]), torch.tensor([9])
    start, end = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([10, 10], dtype=torch.int32)
    caches = [torch.randn(3, kv_heads, slots, dim) for _ in range(2)]
    two_step = [t.clone() for t in (q, k, *caches)]
    kernels.rotary_cache_write_(*two_step[:2], v, table, table.flip(0), positions, *two_step[2:], where)
    expected = kernels.cache_attention(two_step[0], two_step[2][:2], two_step[3][:2], start, end, 0.2, 0)
    before = qkv.clone()
    out = kernels.rotary_cache_attention(q, k, v, table, table.flip(0), positions, *caches, where, start, end, 0.2, 0)
    assert torch.equal(out, expected) and torch.equal(qkv, before)
    assert torch.equal(caches[0], two_step[2]) and torch.equal(caches[1], two_step[3])
    torch.library.opcheck(torch.ops.flux.rotary_cache_attention.default,
                          (q, k, v, table, table, positions, caches[0].clone(), caches[1].clone(), where, start, end,
                           0.2, 0))


def test_the_early_trigger_row_limit_must_be_at_least_one():
    """set_early_trigger's row limit is checked before anything is built (on the GPU the test of
    tests/test_cuda_quant_frag.py checks what it changes); without the extension the trigger is never early."""
    with pytest.raises(ValueError, match="max_rows must be at least 1, got 0"):
        cuda_kernels.set_early_trigger(True, 0)
    assert cuda_kernels.early_trigger_rows() >= 1
    if not torch.cuda.is_available():
        assert not cuda_kernels.trigger_early(1)
