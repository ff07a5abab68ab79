"""Tiny random-init models of every built-in adapter's model_type (a few layers, hidden size 64)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)

TEXT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe",
              "qwen3_moe", "olmoe")
VLM_TYPES = ("llava", "qwen2_vl")
FAST_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")  # what flux's decode loop runs
ALL_TYPES = TEXT_TYPES + VLM_TYPES


def tiny_config(model_type: str):
    if model_type in TEXT_TYPES:
        extra = MOE if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe") else {}
        if model_type == "mistral":
            extra = dict(sliding_window=5)  # shorter than the test sequences: the window must really apply
        return AutoConfig.for_model(model_type, **TEXT, **extra)
    if model_type == "llava":
        return AutoConfig.for_model(
            "llava", text_config=dict(model_type="llama", **TEXT), image_token_index=3,
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8))
    if model_type == "qwen2_vl":
        return AutoConfig.for_model(
            "qwen2_vl", text_config=dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
            image_token_id=3, video_token_id=4, vision_start_token_id=5)
    raise ValueError(model_type)


def tiny_model(model_type: str, *, seed: int = 0) -> torch.nn.Module:
    """A random-init model in fp32 whose norm weights are random too (init values would hide norm-style bugs)."""
    torch.manual_seed(seed)
    config = tiny_config(model_type)
    auto = AutoModelForImageTextToText if model_type in VLM_TYPES else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.2 + 0.5)
    return model


def tiny_inputs(batch: int = 2, length: int = 7, *, vocab: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids away from the special ids (0..5), with the first row left-padded by two tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[0, :2] = 0
        mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}
