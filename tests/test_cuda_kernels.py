"""CUDA kernels against their PyTorch references (GPU only: marked `cuda`, skipped cleanly on CPU).

Tolerances are derived, not tuned: the compiled kernels reproduce the reference's rounding points, so they differ
only by the order of the RMS reduction (a few ulp of the storage type); attention must stay within 2x the error
a bf16 PyTorch SDPA makes against a float64 computation.
"""

import pytest
import torch

from flux_infer import kernels
from flux_infer.kernels import cuda as cuda_kernels

pytestmark = pytest.mark.cuda

ULP = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda_kernels.load(), cuda_kernels.status()


def close(actual, expected, dtype, ulps=4):
    tol = ulps * ULP[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def rel_err(x, truth):
    return ((x.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (7, 769), (3, 5, 5125), (2, 1, 576)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_and_add_rms_norm(dtype, shape, offset):
    x = torch.randn(shape, device="cuda").to(dtype)
    residual = torch.randn(shape, device="cuda").to(dtype)
    w = (torch.randn(shape[-1], device="cuda") * 0.2 + (0 if offset else 1)).to(dtype)
    assert kernels.implementation("rms_norm", "cuda") == "cuda"
    close(kernels.rms_norm(x, w, 1e-6, offset), kernels.rms_norm_ref(x, w, 1e-6, offset), dtype)
    out, summed = kernels.add_rms_norm(x, residual, w, 1e-6, offset)
    ref_out, ref_summed = kernels.add_rms_norm_ref(x, residual, w, 1e-6, offset)
    assert torch.equal(summed, ref_summed)
    close(out, ref_out, dtype)


def test_rms_norm_non_contiguous_rows():
    base = torch.randn(6, 2 * 769, device="cuda", dtype=torch.bfloat16)
    x = base[:, 769:]  # rows with a stride larger than the row
    w = torch.randn(769, device="cuda", dtype=torch.bfloat16)
    close(kernels.rms_norm(x, w, 1e-5, 0.0), kernels.rms_norm_ref(x.contiguous(), w, 1e-5, 0.0), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1, 14336), (16, 14336), (5, 3, 1537), (33, 5125), (3, 1000)])
def test_act_mul_including_strided_views(dtype, activation, shape):
    """Widths divisible by 8 take the 16-byte kernel (14336, 1000), the others the scalar one (1537, 5125)."""
    fused = torch.randn(*shape[:-1], 2 * shape[-1], device="cuda").to(dtype)
    gate, up = fused.chunk(2, dim=-1)
    close(kernels.act_mul(gate, up, activation), kernels.act_mul_ref(gate, up, activation), dtype)


def test_act_mul_in_float64_stays_on_the_reference():
    """The kernels compute the activation in float32: float64 keeps its precision on the reference, and the binding
    refuses it."""
    gate, up = torch.randn(2, 3, 64, device="cuda", dtype=torch.float64).unbind(0)
    assert torch.equal(kernels.act_mul(gate, up, "silu"), kernels.act_mul_ref(gate, up, "silu"))
    with pytest.raises(RuntimeError, match="act_mul"):
        cuda_kernels._state["module"].act_mul(gate, up, 0)


@pytest.fixture
def rotary_launches(monkeypatch):
    """Counts the calls that reach the CUDA binding, so a test cannot pass on a silent fallback to the reference."""
    module = cuda_kernels._state["module"]
    binding, calls = module.rotary_embedding, []

    def counted(*args):
        calls.append(args)
        return binding(*args)

    monkeypatch.setattr(module, "rotary_embedding", counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, dim, rot", [  # 16-bit types with rot % 16 == 0: the 16-byte form;
    (32, 8, 128, 128), (9, 3, 64, 64), (6, 2, 96, 48), (4, 2, 40, 40)])  # float32 and rot 40: the scalar one
@pytest.mark.parametrize("row_offset", [0, 4])  # 4: rows 8 bytes off a 16-byte boundary, the scalar form again
def test_rotary_is_bitwise_the_reference(dtype, heads, kv_heads, dim, rot, row_offset, rotary_launches):
    tokens = 37

    def rows(count):  # [2, tokens, count, dim], each token's heads starting row_offset elements into its row
        flat = torch.randn(2, tokens, count * dim + row_offset, device="cuda").to(dtype)
        return flat[..., row_offset:].view(2, tokens, count, dim)

    q, k = rows(heads), rows(kv_heads)
    angles = torch.arange(512, device="cuda")[:, None] * (1e4 ** (-torch.arange(0, rot, 2, device="cuda") / rot))
    cos = torch.cat([angles, angles], -1).cos()
    sin = torch.cat([angles, angles], -1).sin()
    positions = torch.randint(0, 512, (2, tokens), device="cuda")
    q_ref, k_ref = q.clone(), k.clone()
    kernels.rotary_embedding_ref(q_ref, k_ref, cos, sin, positions)
    kernels.rotary_embedding_(q, k, cos, sin, positions)
    assert len(rotary_launches) == 1
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_views_of_a_fused_projection(dtype, rotary_launches):
    """q, k, v split from one q/k/v output (the layout decode uses, no copies): rotated and cached in place."""
    batch, heads, kv_heads, dim, slots = 4, 8, 2, 64, 16
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, device="cuda").to(dtype)
    table = torch.randn(32, dim, device="cuda")
    positions = torch.randint(0, 32, (batch, 1), device="cuda")
    where = torch.tensor([3], device="cuda")

    def split(t):
        q, k, v = t.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        return (q.view(batch, 1, heads, dim), k.view(batch, 1, kv_heads, dim), v.view(batch, 1, kv_heads, dim))

    expected, got = qkv.clone(), qkv.clone()
    caches = [torch.zeros(batch, kv_heads, slots, dim, device="cuda").to(dtype) for _ in range(4)]
    kernels.rotary_cache_write_ref(*split(expected), table, table.flip(0), positions, caches[0], caches[1], where)
    q, k, v = split(got)
    assert not q.is_contiguous()
    kernels.rotary_cache_write_(q, k, v, table, table.flip(0), positions, caches[2], caches[3], where)
    assert len(rotary_launches) == 1
    assert torch.equal(got, expected) and torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert caches[2].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, dim, rot", [  # partial rotary: 16-bit types take the 16-byte form for
    (8, 2, 64, 48), (8, 2, 40, 24), (32, 8, 128, 64)])  # rot 48 and 64 (64: several blocks per token), else scalar
def test_rotary_cache_write_is_bitwise_the_reference(dtype, heads, kv_heads, dim, rot, rotary_launches):
    batch, tokens, slots = 3, 5, 40
    q = torch.randn(batch, tokens, heads, dim, device="cuda").to(dtype)
    k = torch.randn(batch, tokens, kv_heads, dim, device="cuda").to(dtype)
    v = torch.randn(batch, tokens * 2, kv_heads, dim, device="cuda").to(dtype)[:, ::2]  # strided, like a split
    table = torch.randn(64, rot, device="cuda")
    positions = torch.randint(0, 64, (batch, tokens), device="cuda")
    where = torch.tensor([7, 8, 9, 10, 11], device="cuda")
    caches = [torch.randn(4, kv_heads, slots, dim, device="cuda").to(dtype) for _ in range(2)]
    ref = [t.clone() for t in (q, k, *caches)]
    kernels.rotary_cache_write_ref(ref[0], ref[1], v, table, table.flip(0), positions, ref[2], ref[3], where)
    kernels.rotary_cache_write_(q, k, v, table, table.flip(0), positions, caches[0], caches[1], where)
    assert len(rotary_launches) == 1
    for got, expected in zip((q, k, *caches), ref, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n, k", [(4096, 4096), (1027, 776), (5, 14336)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_against_float64(dtype, rows, n, k, bias):
    x = torch.randn(rows, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    assert kernels.implementation("linear", "cuda") == "cuda"
    out = kernels.linear(x, w, b)
    truth = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert rel_err(out, truth) <= 2 * rel_err(torch.nn.functional.linear(x, w, b), truth) + ULP[dtype]
    three_d = kernels.linear(x[:, None], w, b)  # leading dims are kept
    assert three_d.shape == (rows, 1, n) and torch.equal(three_d[:, 0], out)


@pytest.mark.parametrize("heads, kv_heads, dim", [(32, 8, 128), (9, 3, 64), (4, 4, 80)])
@pytest.mark.parametrize("window", [0, 7])
def test_decode_attention_against_float64(heads, kv_heads, dim, window):
    torch.manual_seed(0)
    batch, slots = 3, 300
    k = torch.randn(batch, kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, 1, heads, dim, device="cuda", dtype=torch.bfloat16)
    start = torch.tensor([0, 5, 17], device="cuda", dtype=torch.int32)
    end = torch.tensor([1, 133, 300], device="cuda", dtype=torch.int32)  # row 0: only its own slot
    scale = dim**-0.5
    assert kernels.implementation("cache_attention", "cuda") == "triton"
    out = kernels.cache_attention(q, k, v, start, end, scale, window)
    truth = kernels.cache_attention_ref(q.double(), k.double(), v.double(), start, end, scale, window)
    low = kernels.cache_attention_ref(q, k, v, start, end, scale, window)
    assert torch.isfinite(out).all()
    assert rel_err(out, truth) <= 2 * rel_err(low, truth) + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, dim, rot", [
    (32, 8, 128, 128), (9, 3, 64, 64), (8, 1, 64, 32), (4, 4, 128, 128), (16, 2, 128, 64)])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("launch", [(0, 0), (1, 1), (3, 2), (8, 4), (2, 8)])
def test_rotary_cache_attention_against_float64(dtype, heads, kv_heads, dim, rot, window, launch, monkeypatch):
    """One launch for rotary + cache write + decode attention: the caches bit for bit the rotary kernel's, the
    output as close to float64 attention (on the same rotated q and cache) as the reference in dtype is."""
    torch.manual_seed(0)
    monkeypatch.setattr(cuda_kernels, "ROTARY_ATTENTION_LAUNCH", launch)
    batch, slots, slot = 3, 300, 130
    qkv = torch.randn(batch, 1, heads + 2 * kv_heads, dim, device="cuda").to(dtype)  # views of a fused projection
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    table = torch.randn(512, rot, device="cuda")
    positions = torch.tensor([[3], [200], [511]], device="cuda")
    caches = [torch.randn(batch + 1, kv_heads, slots, dim, device="cuda").to(dtype) for _ in range(2)]
    start = torch.tensor([0, 5, 17], device="cuda", dtype=torch.int32)
    end = torch.tensor([1, 133, 300], device="cuda", dtype=torch.int32)  # row 0 ends before the written slot
    where = torch.tensor([slot], device="cuda")
    scale = dim**-0.5
    ref = [t.clone() for t in (q, k, *caches)]
    kernels.rotary_cache_write_ref(ref[0], ref[1], v, table, table.flip(0), positions, ref[2], ref[3], where)
    before = qkv.clone()
    assert kernels.rotary_attention_fits(q, k, v, table, table, positions, *caches, where, start, end)
    out = kernels.rotary_cache_attention(q, k, v, table, table.flip(0), positions, caches[0], caches[1], where, start,
                                         end, scale, window)
    assert torch.equal(qkv, before)  # q and k are not rotated in place
    assert torch.equal(caches[0], ref[2]) and torch.equal(caches[1], ref[3])
    rows = slice(0, batch)
    truth = kernels.cache_attention_ref(ref[0].double(), ref[2][rows].double(), ref[3][rows].double(), start, end,
                                        scale, window)
    low = kernels.cache_attention_ref(ref[0], ref[2][rows], ref[3][rows], start, end, scale, window)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert rel_err(out, truth) <= 2 * rel_err(low, truth) + 1e-3


def test_rotary_cache_attention_outside_the_kernel_s_shapes_runs_the_two_kernels():
    """float32 (and head_dim 80) are not the one-launch kernel's: the rotary kernel and cache_attention run on
    copies of q and k, with the reference's result and caches."""
    torch.manual_seed(0)
    for dtype, dim in ((torch.float32, 64), (torch.bfloat16, 80)):
        qkv = torch.randn(2, 1, 12, dim, device="cuda").to(dtype)
        q, k, v = qkv.split([8, 2, 2], dim=2)
        table = torch.randn(64, dim, device="cuda")
        positions, where = torch.tensor([[40], [7]], device="cuda"), torch.tensor([40], device="cuda")
        start, end = torch.tensor([0, 3], dtype=torch.int32, device="cuda"), torch.full((2,), 41, dtype=torch.int32,
                                                                                          device="cuda")
        caches = [torch.randn(2, 2, 48, dim, device="cuda").to(dtype) for _ in range(2)]
        expected_caches = [c.clone() for c in caches]
        expected = kernels.rotary_cache_attention_ref(q, k, v, table, table.flip(0), positions, *expected_caches,
                                                      where, start, end, 0.1, 0)
        before = qkv.clone()
        assert not kernels.rotary_attention_fits(q, k, v, table, table, positions, *caches, where, start, end)
        out = kernels.rotary_cache_attention(q, k, v, table, table.flip(0), positions, *caches, where, start, end,
                                             0.1, 0)
        assert torch.equal(qkv, before)
        assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)  # Triton's float32 dot runs in TF32


def test_rotary_cache_attention_in_a_graph_follows_the_device_metadata():
    """Captured once, replayed as the step's slot and lengths move on the device: each replay equals an eager call
    on fresh caches (the kernel reads positions, slot and lengths from device memory)."""
    torch.manual_seed(0)
    heads, kv_heads, dim, slots = 32, 8, 128, 256
    qkv = torch.randn(1, 1, heads + 2 * kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    table = torch.randn(slots, dim, device="cuda")
    caches = [torch.randn(1, kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    positions, where = torch.tensor([[20]], device="cuda"), torch.tensor([20], device="cuda")
    start, end = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.full((1,), 21, dtype=torch.int32,
                                                                              device="cuda")

    def step(kc, vc):
        return kernels.rotary_cache_attention(q, k, v, table, table.flip(0), positions, kc, vc, where, start, end,
                                              0.1, 0)

    live = [c.clone() for c in caches]
    step(*live)  # compiled and warmed outside the capture
    live = [c.clone() for c in caches]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*live)
    for _ in range(40):  # 20 .. 59: across several 16-key steps
        expected = step(*[c.clone() for c in live])
        graph.replay()
        assert torch.equal(out, expected)
        positions.add_(1), where.add_(1), end.add_(1)
    torch.cuda.synchronize()


def test_opcheck_on_cuda():
    x = torch.randn(3, 5, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.flux.rms_norm.default, (x, w, 1e-6, 0.0))
    torch.library.opcheck(torch.ops.flux.add_rms_norm.default, (x, x.clone(), w, 1e-6, 1.0))
    gate, up = torch.randn(4, 2, 256, device="cuda", dtype=torch.bfloat16).chunk(2, -1)
    torch.library.opcheck(torch.ops.flux.act_mul.default, (gate, up, "silu"))
    q = torch.randn(2, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 3, 2, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(16, 64, device="cuda")
    torch.library.opcheck(torch.ops.flux.rotary_embedding_.default,
                          (q, k, table, table, torch.randint(0, 16, (2, 3), device="cuda")))
    kc = torch.randn(2, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    start = torch.zeros(2, dtype=torch.int32, device="cuda")
    end = torch.full((2,), 40, dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.flux.cache_attention.default,
                          (q[:, :1], kc, kc.clone(), start, end, 0.125, 0))
    torch.library.opcheck(torch.ops.flux.linear.default, (x[0], torch.randn(32, 64, device="cuda",
                                                                           dtype=torch.bfloat16), None))
    gate_up = quantized_case(4, 64, 96, 128, torch.bfloat16)
    torch.library.opcheck(torch.ops.flux.quantized_gated_linear.default,
                          (x[0, :2, :].repeat(1, 2), *gated_inputs(gate_up), "silu"))
    torch.library.opcheck(torch.ops.flux.rotary_cache_attention.default,
                          (q[:, :1], k[:, :1], k[:, 1:2], table, table, torch.randint(0, 16, (2, 1), device="cuda"),
                           kc.clone(), kc.clone(), torch.tensor([9], device="cuda"), start,
                           torch.full((2,), 10, dtype=torch.int32, device="cuda"), 0.125, 0))
    torch.library.opcheck(torch.ops.flux.rotary_cache_write_.default,
                          (q, k, k.clone(), table, table, torch.randint(0, 16, (2, 3), device="cuda"), kc.clone(),
                           kc.clone(), torch.tensor([4, 5, 6], device="cuda")))


def quantized_case(bits, group, n, k, dtype, bias=True):
    from flux_infer.quantization.modules import QuantizedLinear

    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda").to(dtype) if bias else None
    return QuantizedLinear.from_weight(w, b, bits=bits, group_size=group)


def assert_quantized_close(out, module, x):
    """Within twice the error of the PyTorch reference (dequantize, F.linear) against float64."""
    bias = module.bias.double() if module.bias is not None else None
    truth = torch.nn.functional.linear(x.double(), module.dequantize().double(), bias)
    reference = (kernels.int8_linear_ref(x, module.qweight, module.scale, module.bias) if module.bits == 8 else
                 kernels.int4_linear_ref(x, module.qweight, module.scales, module.mins, module.group_size,
                                         module.bias))
    assert out.shape == reference.shape
    assert rel_err(out, truth) <= 2 * rel_err(reference, truth) + ULP[x.dtype]


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("rows, n, k", [  # K not a multiple of a 4-slice step, N not of 16, 1-32 rows and above
    (1, 8197, 14336), (1, 1031, 1024), (2, 8197, 4096), (2, 1031, 1024), (3, 1031, 1024), (8, 1031, 1024),
    (9, 1031, 1024), (16, 1031, 1024), (24, 1031, 1024), (32, 1031, 1024), (33, 1031, 1024), (1, 577, 1152),
    (5, 40, 1152), (17, 577, 1152), (3, 14343, 1024), (12, 14343, 1024), (127, 577, 1152), (128, 577, 1152),
    (320, 1031, 1024)])  # from 33 rows the Triton matmul, from 128 (INT4) / 320 (INT8) cuBLAS on the dense weight
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_linear_against_its_reference(bits, group, rows, n, k, dtype):
    module = quantized_case(bits, group, n, k, dtype)
    assert kernels.implementation(f"int{bits}_linear", "cuda") == "cuda"
    x = torch.randn(rows, k, device="cuda").to(dtype)
    assert_quantized_close(module(x), module, x)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 64), (4, 128)])
@pytest.mark.parametrize("warps, row_tiles, launch_shape", [
    (1, 1, 0), (3, 2, 0), (8, 1, 0), (8, 2, 0), (5, 4, 0), (8, 4, 0), (8, 2, 1), (4, 4, 1), (16, 2, 2), (7, 4, 2)])
@pytest.mark.parametrize("rows", [1, 7, 12, 32])
@pytest.mark.parametrize("int4_mode", [0, 1, 2])
def test_quantized_mma_launch_shapes(bits, group, warps, row_tiles, launch_shape, rows, int4_mode):
    """Every warp count, row tiling, register budget and INT4 form the launcher accepts, not only the ones its
    heuristic picks (launch shapes 1 and 2 serve up to 16 rows)."""
    k = 1152 if group == 128 else 1088  # 1088: K not a multiple of a 4-slice step
    module = quantized_case(bits, group, 1031, k, torch.bfloat16, bias=rows % 2 == 0)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    mins = module.mins if bits == 4 else None
    scales = module.scales if bits == 4 else module.scale
    args = (x, module.qweight, scales, mins, group or 0, module.bias, warps, row_tiles, int4_mode, launch_shape, -1)
    if launch_shape and rows > 16:
        with pytest.raises(RuntimeError, match="launch shape 0, 1 or 2"):
            cuda_kernels._state["module"].quant_mma(*args)
        return
    assert_quantized_close(cuda_kernels._state["module"].quant_mma(*args), module, x)


@pytest.mark.parametrize("n, k, rows", [(1031, 1024, 12), (577, 1152, 3), (1031, 1024, 5)])
@pytest.mark.parametrize("warps, launch_shape", [(0, 0), (0, 1), (0, 2), (12, -1), (4, -1)])
def test_quantized_mma_overrides_stay_consistent(n, k, rows, warps, launch_shape):
    """One of warps / launch shape given, the other chosen: the launcher keeps them compatible."""
    module = quantized_case(4, 128, n, k, torch.bfloat16)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    out = cuda_kernels._state["module"].quant_mma(x, module.qweight, module.scales, module.mins, 128, module.bias,
                                                  warps, 0, 0, launch_shape, -1)
    assert_quantized_close(out, module, x)


def test_quant_mma_plans_override_the_launch_plan_per_shape(monkeypatch):
    module = cuda_kernels._state["module"]
    binding, calls = module.quant_mma, []
    monkeypatch.setattr(module, "quant_mma", lambda *args: calls.append(args[6:10]) or binding(*args))
    monkeypatch.setattr(cuda_kernels, "QUANT_MMA_PLANS", {(1031, 1024): (3, 1, 2, 0)})
    layer = quantized_case(4, 128, 1031, 1024, torch.bfloat16)
    for rows in (1, 8, 9):  # up to 8 rows the table's plan, above it the launcher's
        x = torch.randn(rows, 1024, device="cuda").to(torch.bfloat16)
        assert_quantized_close(layer(x), layer, x)
    assert calls == [(3, 1, 2, 0), (3, 1, 2, 0), (0, 0, 0, -1)]


def gated_inputs(module):
    return (module.qweight, module.scale if module.bits == 8 else module.scales,
            module.mins if module.bits == 4 else None, module.group_size or 0, module.bias)


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("rows, half, k", [  # half: gate (= up) width, not a multiple of a tile's 7 or 8 outputs
    (1, 14343, 1024), (1, 515, 1152), (2, 515, 1024), (8, 515, 1024), (9, 515, 1024), (16, 7177, 1024),
    (17, 515, 1024), (32, 515, 1152), (33, 515, 1024)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_quantized_gated_linear_equals_the_layer_then_act_mul(bits, group, rows, half, k, activation):
    """act(gate) * up in the matmul's epilogue: bit for bit the separate layer followed by act_mul (the epilogue
    rounds where they do and the launch plan is the whole [gate; up] layer's, so every sum is the same)."""
    module = quantized_case(bits, group, 2 * half, k, torch.bfloat16, bias=rows % 2 == 1)
    x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
    fused = kernels.quantized_gated_linear(x, *gated_inputs(module), activation)
    gate, up = module(x).chunk(2, dim=-1)
    assert fused.shape == (rows, half)
    assert torch.equal(fused, kernels.act_mul(gate, up, activation))


@pytest.mark.parametrize("bits, group", [(8, None), (4, 64), (4, 128)])
@pytest.mark.parametrize("warps, row_tiles, launch_shape", [(3, 1, 0), (8, 4, 0), (4, 2, 1), (16, 2, 2), (7, 4, 2)])
@pytest.mark.parametrize("rows", [1, 12, 32])
@pytest.mark.parametrize("int4_mode", [1, 2])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_quantized_gated_launch_shapes(bits, group, warps, row_tiles, launch_shape, rows, int4_mode, activation):
    """Every launch the gated epilogue can take, against act(gate) * up computed in float64."""
    if launch_shape and rows > 16:
        return
    k = 1152 if group == 128 else 1088
    module = quantized_case(bits, group, 2 * 515, k, torch.float16, bias=True)
    x = torch.randn(rows, k, device="cuda").to(torch.float16)
    qweight, scales, mins, group_size, bias = gated_inputs(module)
    out = cuda_kernels._state["module"].quant_mma(x, qweight, scales, mins, group_size, bias, warps, row_tiles,
                                                  int4_mode, launch_shape, kernels.ACTIVATIONS.index(activation))
    full = torch.nn.functional.linear(x.double(), module.dequantize().double(), bias.double())
    truth = kernels.act_mul_ref(*full.chunk(2, dim=-1), activation)
    reference = kernels.quantized_gated_linear_ref(x, qweight, scales, mins, group_size, bias, activation)
    assert out.shape == reference.shape
    assert rel_err(out, truth) <= 2 * rel_err(reference, truth) + ULP[x.dtype]


def test_quantized_gated_linear_rejects_an_odd_layer():
    module = quantized_case(4, 64, 515, 1024, torch.bfloat16)
    x = torch.randn(3, 1024, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="even N"):
        cuda_kernels._state["module"].quant_mma(x, *gated_inputs(module), 0, 0, 0, -1, 0)


NORM_PLANS = [(0, 0, 0, -1), (3, 1, 2, 0), (8, 4, 1, 0), (4, 2, 2, 1), (16, 2, 1, 2), (7, 4, 2, 2)]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows, n, k", [(1, 4096, 14336), (1, 577, 1152), (3, 1031, 1024), (8, 40, 1152),
                                        (5, 1031, 1024), (8, 577, 1152)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("plan", NORM_PLANS)
def test_int4_linear_add_norm_is_the_layer_and_the_add_bit_for_bit(group, rows, n, k, dtype, plan, monkeypatch):
    """h is the plain kernel's output plus the residual exactly (same launch, so the same sums), normed is h times
    the norm's weight rounded once, and the partial sums of squares (one slot per block, zeros after) add up to
    sum(h^2) per row."""
    if group == 128 and k % 128:
        k = 1152
    monkeypatch.setattr(cuda_kernels, "QUANT_MMA_PLANS", {(n, k): plan} if plan[0] else {})
    layer = quantized_case(4, group, n, k, dtype, bias=rows % 2 == 1)
    x, residual = torch.randn(rows, k, device="cuda").to(dtype), torch.randn(rows, n, device="cuda").to(dtype)
    weight = (torch.rand(n, device="cuda") + 0.5).to(dtype)
    normed, h, partials = layer.add_norm(x, residual, weight)
    if rows == 1 and not plan[0]:  # a single row's add-norm layer runs 8-warp one-tile blocks (quant_linear_norm.cu)
        monkeypatch.setattr(cuda_kernels, "QUANT_MMA_PLANS", {(n, k): (8, 1, 0, 0)})
    assert torch.equal(h, layer(x) + residual)
    assert torch.equal(normed, (h.float() * weight.float()).to(dtype))
    assert partials.shape == (rows, kernels.quant.norm_partial_slots(n)) and partials.dtype == torch.float32
    torch.testing.assert_close(partials.sum(-1), h.float().pow(2).sum(-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("rows, n, k", [(1, 6144, 4096), (1, 1031, 1152), (5, 577, 1152), (7, 1031, 1024),
                                        (8, 40, 1152)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("plan", NORM_PLANS)
def test_int4_linear_norm_scaled_against_float64(group, rows, n, k, dtype, activation, plan, monkeypatch):
    """The layer after a norm: (x @ W.T) * rsqrt(sum(partials) / K + eps) + bias within twice the reference's error
    against float64; gated, bit for bit the un-gated layer's halves through act_mul (same launch, same scale)."""
    if group == 128 and k % 128:
        k = 1152
    n = 2 * n if activation else n
    monkeypatch.setattr(cuda_kernels, "QUANT_MMA_PLANS", {(n, k): plan} if plan[0] else {})
    layer = quantized_case(4, group, n, k, dtype, bias=rows % 2 == 0)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    partials = torch.rand(rows, 37, device="cuda") * k / 20  # a mean square around 1
    eps = 1e-5
    out = layer.norm_scaled(x, partials, eps, activation)
    scale = torch.rsqrt(partials.double().sum(-1, keepdim=True) / k + eps)
    full = torch.nn.functional.linear(x.double(), layer.dequantize().double()) * scale
    if layer.bias is not None:
        full = full + layer.bias.double()
    if activation is None:
        truth = full
        reference = kernels.int4_linear_norm_scaled_ref(x, layer.qweight, layer.scales, layer.mins, group, layer.bias,
                                                        partials, eps)
    else:
        truth = kernels.act_mul_ref(*full.chunk(2, dim=-1), activation)
        reference = kernels.int4_gated_linear_norm_scaled_ref(x, layer.qweight, layer.scales, layer.mins, group,
                                                              layer.bias, partials, eps, activation)
        gate, up = layer.norm_scaled(x, partials, eps).chunk(2, dim=-1)
        assert torch.equal(out, kernels.act_mul(gate, up, activation))
    assert out.shape == reference.shape
    assert rel_err(out, truth) <= 2 * rel_err(reference, truth) + ULP[dtype]


def test_norm_epilogues_take_up_to_8_rows_then_run_the_reference():
    layer = quantized_case(4, 64, 577, 1152, torch.bfloat16)
    module = cuda_kernels._state["module"]
    x, partials = torch.randn(9, 1152, device="cuda").to(torch.bfloat16), torch.ones(9, 3, device="cuda")
    with pytest.raises(RuntimeError, match="up to 8 rows"):
        module.quant_mma_scale_norm(x, layer.qweight, layer.scales, layer.mins, 64, None, partials, 1e-5,
                                    0, 0, 0, -1, -1)
    out = layer.norm_scaled(x, partials, 1e-5)  # the op itself: the reference above 8 rows
    torch.testing.assert_close(out, kernels.int4_linear_norm_scaled_ref(x, layer.qweight, layer.scales, layer.mins,
                                                                        64, layer.bias, partials, 1e-5))
    with pytest.raises(RuntimeError, match="slots must be at least"):
        module.quant_mma_add_norm(x[:2], layer.qweight, layer.scales, layer.mins, 64, None,
                                  torch.zeros(2, 577, device="cuda", dtype=torch.bfloat16),
                                  torch.ones(577, device="cuda", dtype=torch.bfloat16), 38, 0, 0, 0, -1)


def test_opcheck_norm_epilogue_ops():
    layer = quantized_case(4, 64, 96, 128, torch.bfloat16)
    x = torch.randn(2, 128, device="cuda").to(torch.bfloat16)
    args = (x, layer.qweight, layer.scales, layer.mins, 64, layer.bias)
    torch.library.opcheck(torch.ops.flux.int4_linear_add_norm.default,
                          (*args, torch.randn(2, 96, device="cuda").to(torch.bfloat16),
                           torch.ones(96, device="cuda", dtype=torch.bfloat16)))
    partials = torch.rand(2, 7, device="cuda")
    torch.library.opcheck(torch.ops.flux.int4_linear_norm_scaled.default, (*args, partials, 1e-5))
    torch.library.opcheck(torch.ops.flux.int4_gated_linear_norm_scaled.default, (*args, partials, 1e-5, "silu"))


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_weight_is_the_references_bit_for_bit(bits, group, dtype):
    module = quantized_case(bits, group, 1031, 1152 if group != 64 else 1088, dtype)
    scales = module.scales if bits == 4 else module.scale
    mins = module.mins if bits == 4 else None
    dense = cuda_kernels._state["module"].dequantize_weight(module.qweight, scales, mins, group or 0)
    assert dense.dtype == dtype and torch.equal(dense, module.dequantize())


def test_quantized_mma_int4_weights_are_the_references_bit_for_bit():
    """An identity input reads back each dequantized weight: INT4 dequantization is exact (one rounding, as the
    reference's), so the kernel's columns equal the reference weight exactly."""
    module = quantized_case(4, 32, 96, 256, torch.bfloat16, bias=False)
    eye = torch.eye(256, device="cuda", dtype=torch.bfloat16)
    columns = torch.cat([module(eye[i:i + 32]) for i in range(0, 256, 32)])  # 32 rows per call: the MMA path
    assert torch.equal(columns.T, module.dequantize())


def paged_pool(lengths, kv_heads, dim, block_size, int8):
    """A bf16 (or INT8) pool with each sequence's blocks scattered over it: k, v, scales, block tables, lengths."""
    from flux_infer.kernels import quantize_kv_int8

    torch.manual_seed(0)
    blocks = sum(-(-n // block_size) for n in lengths) + 2
    k = torch.randn(blocks * block_size, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(blocks * block_size, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    k_scale = v_scale = None
    if int8:
        (k, k_scale), (v, v_scale) = quantize_kv_int8(k), quantize_kv_int8(v)
    free = torch.randperm(blocks).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    return k, v, k_scale, v_scale, table, torch.tensor(lengths, dtype=torch.int32, device="cuda")


def assert_paged_attention_close(q, k, v, k_scale, v_scale, args):
    """The CUDA paged attention is at most twice as far from a float64 run of the reference as the reference in
    the inputs' own dtype (INT8 codes stay codes: their dequantization is part of what is compared)."""
    int8 = k_scale is not None
    out = kernels.paged_attention(q, k, v, *args, k_scale, v_scale)
    truth = kernels.paged_attention_ref(q.double(), k if int8 else k.double(), v if int8 else v.double(), *args,
                                        k_scale, v_scale)
    low = kernels.paged_attention_ref(q, k, v, *args, k_scale, v_scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, truth) <= 2 * rel_err(low, truth) + 1e-3


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("heads, kv_heads, dim, block_size, window", [(32, 8, 128, 16, 0), (9, 3, 64, 17, 5)])
def test_paged_decode_attention_against_float64(int8, heads, kv_heads, dim, block_size, window):
    lengths = [1, 15, 16, 17, 300]
    k, v, k_scale, v_scale, table, lens = paged_pool(lengths, kv_heads, dim, block_size, int8)
    starts = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), heads, dim, device="cuda", dtype=torch.bfloat16)
    assert kernels.implementation("paged_attention", "cuda") == "triton"
    assert_paged_attention_close(q, k, v, k_scale, v_scale, (table, lens, starts, block_size, dim**-0.5, window))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("heads, kv_heads, dim, block_size, window", [(32, 8, 128, 16, 0), (9, 3, 64, 17, 5),
                                                                       (4, 4, 64, 15, 0)])
def test_paged_prefill_attention_against_float64(int8, heads, kv_heads, dim, block_size, window):
    """A mixed step: prefill chunks (first, middle, at block boundaries, longer than a tile) and decodes."""
    spec = [(1, 1), (5, 20), (16, 16), (17, 40), (130, 130), (1, 300), (3, 3), (64, 200)]  # (new, context)
    k, v, k_scale, v_scale, table, lens = paged_pool([c for _, c in spec], kv_heads, dim, block_size, int8)
    counts = torch.tensor([0] + [n for n, _ in spec])
    starts = counts.cumsum(0).to(device="cuda", dtype=torch.int32)
    q = torch.randn(int(counts.sum()), heads, dim, device="cuda", dtype=torch.bfloat16)
    assert_paged_attention_close(q, k, v, k_scale, v_scale, (table, lens, starts, block_size, dim**-0.5, window))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_kv_write_matches_reference_exactly(int8, dtype):
    torch.manual_seed(0)
    tokens, kv_heads, dim, slots = 37, 8, 128, 300
    qkv = torch.randn(tokens, 3, kv_heads, dim, device="cuda", dtype=dtype) * 3
    k, v = qkv[:, 1], qkv[:, 2]  # strided views, as split from a fused projection
    slot_mapping = torch.randperm(slots, device="cuda")[:tokens]

    def pools():
        store = torch.int8 if int8 else dtype
        made = [torch.zeros(slots, kv_heads, dim, device="cuda", dtype=store) for _ in range(2)]
        made += [torch.zeros(slots, kv_heads, device="cuda") if int8 else None for _ in range(2)]
        return made

    fast, ref = pools(), pools()
    assert kernels.implementation("paged_kv_write_", "cuda") == "triton"
    kernels.paged_kv_write_(k, v, *fast[:2], slot_mapping, *fast[2:])
    kernels.paged_kv_write_ref(k, v, *ref[:2], slot_mapping, *ref[2:])
    for got, want in zip(fast, ref):
        if want is not None:
            assert torch.equal(got, want)


def test_early_trigger_changes_no_result():
    """Single-row linear layers and decode attention let the next kernel launch from their start (it still waits
    for their results before reading them): a graph of dependent launches, RMSNorm, SwiGLU and rotary + cache write
    among them, gives the same bits early or late."""
    if not cuda_kernels.programmatic_launch():
        pytest.skip("programmatic dependent launch needs Hopper or later")
    layers = [quantized_case(4, 128, 1024, 1024, torch.bfloat16), quantized_case(8, None, 1024, 1024, torch.bfloat16),
              quantized_case(4, 64, 1024, 1024, torch.bfloat16)]
    gate_up = quantized_case(4, 128, 2048, 1024, torch.bfloat16, bias=False)  # gated INT4
    dense = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    norm = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    k = torch.randn(1, 8, 300, 128, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(2, 1, 2, 301, 128, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(512, 128, device="cuda")
    position = torch.tensor([[299]], device="cuda")
    start = torch.zeros(1, dtype=torch.int32, device="cuda")
    end = torch.full((1,), 300, dtype=torch.int32, device="cuda")

    def chain():
        h, residual = x, x
        for layer in layers:
            h, residual = kernels.add_rms_norm(h, residual, norm, 1e-5, 0.0)
            h = layer(h)
            h = kernels.act_mul(h, kernels.linear(h, dense, None), "silu")
            h = kernels.quantized_gated_linear(h, *gated_inputs(gate_up), "silu")
            heads = h.view(1, 1, 8, 128)  # rotated in place as 4 query, 2 key and 2 value heads
            kernels.rotary_cache_write_(heads[:, :, :4], heads[:, :, 4:6], heads[:, :, 6:], table, table.flip(0),
                                        position, cache[0], cache[1], position[0])
            h = kernels.cache_attention(heads, k, k, start, end, 0.1, 0).view(1, 1024)
        return h, residual, cache

    eager = [t.clone() for t in chain()]  # launch by launch from Python: what every graph must reproduce
    results = []
    try:
        for early in (True, False):
            cuda_kernels.set_early_trigger(early)
            assert cuda_kernels.early_trigger() == early
            chain()  # Triton compiles each variant outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            graph.replay()
            torch.cuda.synchronize()
            results.append([t.clone() for t in out])
    finally:
        cuda_kernels.set_early_trigger(True)
    for got in results:
        assert all(torch.equal(g, e) for g, e in zip(got, eager))
    assert all(torch.isfinite(t).all() for t in eager)
