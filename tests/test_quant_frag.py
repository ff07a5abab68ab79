"""The fragment layout of INT4 codes (kernels/quant_frag.py) on the CPU: the permutation and its inverse, what a word
holds, the references of its ops, and QuantizedLinear holding it (forward, the norm pieces, state_dict, loading)."""

import random

import pytest
import torch

from flux_infer.kernels import quant, quant_frag
from flux_infer.quantization.modules import QuantizedLinear


def layer(n=64, k=256, bias=True, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) / k**0.5
    return QuantizedLinear.from_weight(w.bfloat16(), torch.randn(n).bfloat16() if bias else None, bits=4,
                                       group_size=128)


def test_to_fragments_round_trips_and_places_each_code_where_the_kernel_reads_it():
    module = layer(96, 512)
    q, s, m = quant_frag.to_fragments(module.qweight, module.scales, module.mins)
    assert q.shape == module.qweight.shape and s.shape == module.scales.shape and q.dtype == torch.int32
    for got, want in zip(quant_frag.from_fragments(q, s, m), (module.qweight, module.scales, module.mins),
                         strict=True):
        assert torch.equal(got, want)
    codes, words, groups = quant.unpack_int4(module.qweight), q.flatten(), 512 // 128
    rng = random.Random(0)
    for _ in range(300):  # word (p, g, t, j) of tile lt, group grp: feature 32 lt + 8 j + g, nibble a + 4 b
        lt, grp, p, g, t, j = (rng.randrange(3), rng.randrange(groups), rng.randrange(4), rng.randrange(8),
                               rng.randrange(4), rng.randrange(4))
        word = int(words[((lt * groups + grp) * 128 + p * 32 + 4 * g + t) * 4 + j]) & 0xFFFFFFFF
        for a in range(4):
            for b in range(2):
                code = codes[32 * lt + 8 * j + g, grp * 128 + 32 * p + 8 * a + 2 * t + b]
                assert (word >> (4 * (a + 4 * b))) & 15 == code
    half = groups // 2
    for _ in range(200):  # the pair (c, t, j, e) of group grp: the first half of the groups in scales, then in mins
        lt, grp, t, j, e = rng.randrange(3), rng.randrange(groups), rng.randrange(4), rng.randrange(4), rng.randrange(2)
        flat = (s if grp < half else m).flatten()
        at = lt * groups * 32 + (grp % half) * 64 + t * 8 + j * 2 + e
        feature = 32 * lt + 8 * j + 2 * t + e
        assert flat[at] == module.scales[feature, grp] and flat[at + 32] == module.mins[feature, grp]


def test_a_tile_keeps_its_rows_so_row_slices_of_32_convert_alone():
    module = layer(128, 256)
    whole = quant_frag.to_fragments(module.qweight, module.scales, module.mins)
    halves = [quant_frag.to_fragments(module.qweight[r:r + 64], module.scales[r:r + 64], module.mins[r:r + 64])
              for r in (0, 64)]
    blocks = quant_frag._by_rows(quant_frag._to_fragments, module.qweight, module.scales, module.mins, rows=32)
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
        assert torch.equal(whole[i], blocks[i])


@pytest.mark.parametrize("n, k, group, dtype", [(48, 256, 128, torch.bfloat16), (64, 256, 64, torch.bfloat16),
                                                (64, 256, 128, torch.float16), (64, 384, 128, torch.bfloat16)])
def test_layers_the_layout_cannot_take_are_refused_with_the_reason(n, k, group, dtype):
    torch.manual_seed(0)
    module = QuantizedLinear.from_weight(torch.randn(n, k).to(dtype), None, bits=4, group_size=group)
    assert not module.fragments_fit
    with pytest.raises(ValueError, match="fragment layout needs"):
        module.set_fragments(True)


def test_a_layer_in_the_fragment_layout_computes_and_saves_what_it_did_before():
    module, x = layer(), torch.randn(3, 256).bfloat16()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    residual, weight = torch.randn(3, 64).bfloat16(), torch.rand(64).bfloat16() + 0.5
    partials = torch.rand(3, 5) * 50
    before = (module(x), module.gated(x, "silu"), module.add_norm(x, residual, weight),
              module.norm_scaled(x, partials, 1e-5), module.norm_scaled(x, partials, 1e-5, "gelu_tanh"),
              module.dequantize())
    module.set_fragments(True)
    assert module.fragments and "fragments" in repr(module)
    assert not torch.equal(module.qweight, state["qweight"])  # reordered in place
    after = (module(x), module.gated(x, "silu"), module.add_norm(x, residual, weight),
             module.norm_scaled(x, partials, 1e-5), module.norm_scaled(x, partials, 1e-5, "gelu_tanh"),
             module.dequantize())
    for got, want in zip(after, before, strict=True):
        if isinstance(want, tuple):  # add_norm: the same normed and h; its sums of squares one slot per 32 outputs
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert got[2].shape == (3, 2)
            torch.testing.assert_close(got[2].sum(-1), want[2].sum(-1))
        else:
            assert torch.equal(got, want)
    saved = module.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state.items())  # the checkpoint layout
    fresh = layer(seed=1)
    fresh.set_fragments(True)
    fresh.load_state_dict(state)  # arrives in the checkpoint layout, stays in the fragment layout
    assert fresh.fragments and torch.equal(fresh(x), before[0])
    module.set_fragments(False)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def test_members_of_a_fused_projection_follow_its_storage():
    gate, up = layer(seed=2), layer(seed=3)
    state = {f"{name}.{k}": v.clone() for name, m in (("gate", gate), ("up", up)) for k, v in m.state_dict().items()}
    fused = QuantizedLinear(256, 128, bits=4, group_size=128, bias=True, dtype=torch.bfloat16)
    for name in ("qweight", "scales", "mins", "bias"):
        setattr(fused, name, torch.cat([getattr(gate, name), getattr(up, name)]))
        setattr(gate, name, getattr(fused, name)[:64])
        setattr(up, name, getattr(fused, name)[64:])
    x = torch.randn(2, 256).bfloat16()
    before = (fused.gated(x, "silu"), gate(x), up(x))
    fused.set_fragments(True)
    gate.set_fragments(True, storage_only=True)
    up.set_fragments(True, storage_only=True)
    assert torch.equal(fused.gated(x, "silu"), before[0])
    assert torch.equal(gate(x), before[1]) and torch.equal(up(x), before[2])
    got = {f"{name}.{k}": v for name, m in (("gate", gate), ("up", up)) for k, v in m.state_dict().items()}
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_the_fake_implementations_give_the_shapes():
    module, x = layer(), torch.randn(2, 256).bfloat16()
    module.set_fragments(True)
    args = (x, module.qweight, module.scales, module.mins, module.bias)
    torch.library.opcheck(torch.ops.flux.int4f_linear.default, (*args, "silu", None, 0.0))
    torch.library.opcheck(torch.ops.flux.int4f_linear.default, (*args, "", torch.rand(2, 3), 1e-5))
    torch.library.opcheck(torch.ops.flux.int4f_linear_add_norm.default,
                          (*args, torch.randn(2, 64).bfloat16(), torch.ones(64).bfloat16()))


def test_the_plugin_is_on_by_default_with_int4_and_says_why_it_does_not_apply_on_the_cpu():
    import flux_infer
    from flux_infer import InferenceConfig, OptimizationLevel
    from flux_infer.plugins.int4_fragments import Int4FragmentsPlugin
    from tests.tiny_models import tiny_model

    assert Int4FragmentsPlugin().enabled_levels() == (OptimizationLevel.O3,)  # int4-awq; O2 is INT8
    model = tiny_model("llama")
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1"))
    assert "int4_fragments" not in [s.name for s in model.flux_report.skipped]  # no INT4: not even considered
    model = tiny_model("llama")
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", quantization="int4"))
    assert "int4_fragments" not in [s.name for s in model.flux_report.applied]
    skipped = {s.name: s.reason for s in model.flux_report.skipped}
    assert "CUDA" in skipped["int4_fragments"]
    model = tiny_model("llama")
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", quantization="int4",
                                                      exclude=["int4_fragments"]))
    skipped = {s.name: s.reason for s in model.flux_report.skipped}
    assert "excluded" in skipped["int4_fragments"]


@pytest.mark.parametrize("roles", [("qkv", "o", "gate_up", "down", "lm_head"), ("gate_up", "down", "lm_head")])
def test_decode_steps_keep_the_norms_in_the_layers_up_to_16_rows_only_when_every_layer_around_them_switched(
        roles, monkeypatch):
    """The norm-fused decode step (generation/norm_fusion.py) takes 16 rows when every INT4 layer around a norm is
    in the fragment layout (its kernel's norm epilogues take 16 rows), else 8 (the checkpoint layout's): the
    plugin applied on the CPU (its layout is for the CUDA kernel; the references compute it here)."""
    import flux_infer
    from flux_infer import InferenceConfig
    from flux_infer.generation import norm_fusion
    from flux_infer.generation.runner import DecoderRunner
    from flux_infer.plugins import int4_fragments
    from flux_infer.plugins.fuse_projections import FuseProjectionsPlugin
    from flux_infer.plugins.manager import get_plugin_manager
    from flux_infer.support import Support
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
    model = AutoModelForCausalLM.from_config(config).bfloat16().eval()
    for plugin in (int4_fragments.Int4FragmentsPlugin, FuseProjectionsPlugin):  # both CUDA-only: here as there
        monkeypatch.setattr(plugin, "supports", lambda self, model, ctx: Support.yes())
    monkeypatch.setattr(int4_fragments, "ROLES", roles)
    flux_infer.optimize(model, config=InferenceConfig(optimization_level="O1", quantization="int4",
                                                      quantization_group_size=128, quantize_lm_head=True,
                                                      plugins=["int4_fragments"]))
    assert any(isinstance(m, QuantizedLinear) and m.fragments for m in model.modules())
    fusion = DecoderRunner(model, get_plugin_manager().adapter_for(model)).norm_fusion
    assert fusion is not None
    everything = set(roles) == {"qkv", "o", "gate_up", "down", "lm_head"}
    assert fusion.max_rows == (norm_fusion.FRAGMENT_MAX_ROWS if everything else norm_fusion.MAX_ROWS)
    assert fusion.fits(torch.empty(16, 1, 256)) == everything and fusion.fits(torch.empty(8, 1, 256))
    flux_infer.revert(model)
    fusion = DecoderRunner(model, get_plugin_manager().adapter_for(model)).norm_fusion
    assert fusion is None or fusion.max_rows == norm_fusion.MAX_ROWS
