"""Tiny random Jamba checkpoints written by transformers, the reference our numbers must match."""

from __future__ import annotations

from pathlib import Path

import torch

# Each config exercises a different corner of the architecture. All are small enough for CPU tests.
BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    attn_layer_period=3, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
)
CONFIGS = {
    "default-periods": dict(BASE, num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4),
    # top-1 routing, multi-query attention, explicit dt rank, conv width 3, expand 1, odd offsets
    "mqa-top1": dict(BASE, num_key_value_heads=1, num_experts_per_tok=1, mamba_dt_rank=5, mamba_d_conv=3,
                     mamba_expand=1, attn_layer_period=4, attn_layer_offset=0, expert_layer_period=3, expert_layer_offset=2),
    # every layer MoE, attention every other layer, tied embeddings, list of eos ids, proj biases
    "all-moe-tied": dict(BASE, expert_layer_period=1, expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1,
                         tie_word_embeddings=True, eos_token_id=[2, 5], mamba_proj_bias=True, num_experts=3),
}


def make_hf_model(name: str, classification: bool = False, num_labels: int = 3, seed: int = 0):
    from transformers import JambaConfig, JambaForCausalLM, JambaForSequenceClassification

    cfg = JambaConfig(**CONFIGS[name], num_labels=num_labels)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (JambaForSequenceClassification if classification else JambaForCausalLM)(cfg)
    sharpen(model)
    return model.eval()


@torch.no_grad()
def sharpen(model) -> None:
    """HF's init (std 0.02) gives near-uniform outputs; larger random weights make a sharper test.
    A_log keeps its S4D-real init (log 1..d_state, which both inits start from) plus noise."""
    for n, p in model.named_parameters():
        if n.endswith("A_log"):
            p.add_(0.5 * torch.rand_like(p))
        elif "norm" in n or n.endswith(".D"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.normal_(0, 0.15)


def save_hf_model(model, path: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(path, max_shard_size=shard)
    return path
