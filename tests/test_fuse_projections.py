"""fuse_projections, applied directly on the CPU (the planner only schedules it on CUDA, where it pays)."""

import pytest
import torch
from plugin_helpers import forward_logits
from tiny_models import tiny_inputs, tiny_model

import flux_infer
from flux_infer.patching import PatchRecorder
from flux_infer.plugins.fuse_projections import FuseProjectionsPlugin
from flux_infer.plugins.manager import get_plugin_manager


def fuse(model):
    """Apply the plugin directly (the planner schedules it only on CUDA); returns its context and recorder."""
    recorder = PatchRecorder()
    ctx = flux_infer.ApplyContext(flux_infer.InferenceConfig().resolved(), get_plugin_manager().adapter_for(model),
                                  torch.device("cpu"), torch.float32, patch=recorder)
    FuseProjectionsPlugin().apply(model, ctx)
    return ctx, recorder


def test_fusion_keeps_parameters_and_state_dict_and_rollback_separates_storage():
    model = tiny_model("qwen2")  # q/k/v with biases
    inputs = tiny_inputs()
    expected = forward_logits(model, inputs)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx, recorder = fuse(model)
    assert ctx.details == {"qkv": 2, "gate_up": 2}
    attention = model.model.layers[0].self_attn
    fused = attention.flux_fused_qkv
    assert fused.sizes == (64, 32, 32) and fused.bias is not None
    q, k = attention.q_proj.weight, attention.k_proj.weight
    assert q.data_ptr() == fused.weight.data_ptr() and k.data_ptr() == fused.weight[64:].data_ptr()
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert torch.allclose(forward_logits(model, inputs), expected, atol=1e-6)

    assert recorder.rollback() == []
    assert not hasattr(attention, "flux_fused_qkv")
    assert attention.q_proj.weight.data_ptr() != attention.k_proj.weight.data_ptr() - 64 * 64 * 4
    assert attention.q_proj.weight.untyped_storage().nbytes() == 64 * 64 * 4  # its own storage again
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_adapter_lists_every_decoder_linear():
    model = tiny_model("llama")
    adapter = get_plugin_manager().adapter_for(model)
    names = [n for n, *_ in adapter.linears(model)]
    assert len(names) == 2 * 7 and names[0] == "layers.0.self_attn.q_proj" and names[-1] == "layers.1.mlp.down_proj"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_projections_fuse_into_one_quantized_linear(quantization, tmp_path):
    from flux_infer.engine import Engine
    from flux_infer.quantization.modules import QuantizedLinear

    model = tiny_model("llama")
    flux_infer.optimize(model, config=flux_infer.InferenceConfig(optimization_level="O0", quantization=quantization,
                                                                 quantization_group_size=32))
    prompts = [[5, 9, 2, 7, 11], [3, 3, 8]]

    def engine_tokens():
        engine = Engine(model, None, num_blocks=32, block_size=4)
        ids = [engine.add_request(p, max_new_tokens=6, stop_token_ids=[]) for p in prompts]
        done = engine.run()
        return [done[i].output_ids for i in ids]

    expected = engine_tokens()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx, recorder = fuse(model)
    assert ctx.details == {"qkv": 2, "gate_up": 2}
    attention = model.model.layers[0].self_attn
    fused = attention.flux_fused_qkv
    assert isinstance(fused.quantized, QuantizedLinear) and fused.sizes == (64, 32, 32)
    assert attention.k_proj.qweight.data_ptr() == fused.quantized.qweight[64:].data_ptr()  # views, no copies
    x = torch.randn(3, 64)
    separate = torch.cat([attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)], dim=-1)
    torch.testing.assert_close(fused(x), separate, rtol=1e-5, atol=1e-5)
    mlp = model.model.layers[0].mlp  # [gate; up] rows: gated() is act(gate) * up of the separate layers
    gated = mlp.flux_fused_gate_up.quantized.gated(x, "silu")
    torch.testing.assert_close(gated, torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x), rtol=1e-5,
                               atol=1e-5)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert engine_tokens() == expected  # the runner's fused path gives the same greedy tokens
    model.save_pretrained(tmp_path)  # views of one buffer save as separate tensors
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "flux-quantized.safetensors")
    assert torch.equal(saved["model.layers.0.self_attn.k_proj.qweight"], state["model.layers.0.self_attn.k_proj.qweight"])

    assert recorder.rollback() == []
    assert not hasattr(attention, "flux_fused_qkv")
    assert attention.k_proj.qweight.untyped_storage().nbytes() == attention.k_proj.qweight.nbytes  # own storage
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_flux_linear_layers_fuse_too():
    """fused_kernels swaps decoder linears for FluxLinear on CUDA before fusion runs: they must still fuse."""
    from flux_infer.plugins.fuse_projections import _fusable
    from flux_infer.plugins.fused_kernels import FluxLinear

    layers = [FluxLinear(torch.nn.Linear(64, size, bias=False)) for size in (64, 32, 32)]
    assert _fusable(layers)
    assert not _fusable([layers[0], FluxLinear(torch.nn.Linear(32, 32, bias=False))])  # different input sizes


def test_fused_model_saves_and_loads_with_transformers(tmp_path):
    """Parameters that are views of one fused buffer save as separate tensors through save_pretrained."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    fuse(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
