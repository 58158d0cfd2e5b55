"""FastDecoder: the forward pass of dense Qwen2/Qwen3/Llama models over flat token batches.

It runs the HF model's own modules (embedding, projections, norms, rotary embedding,
MLP), so parameters keep their HF names and weight sync is by name, and replaces only
the attention: tokens of many sequences are one flat (T,) batch, and `attend(layer,
q, k, v)` (given by the runner) writes K/V into the paged cache and attends.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

SUPPORTED_FAMILIES = ("qwen2", "qwen3", "llama")


def supports(config) -> bool:
    """Dense families with full attention only (others run on the HF engine)."""
    sliding = getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window",
                                                                        None)
    return config.model_type in SUPPORTED_FAMILIES and not sliding


class FastDecoder(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not supports(hf_model.config):
            raise ValueError(f"the fast engine runs {', '.join(SUPPORTED_FAMILIES)} models "
                             f"without sliding windows, not {hf_model.config.model_type}")
        self.hf_model = hf_model
        self.decoder = hf_model.base_model
        config = hf_model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_layers = config.num_hidden_layers
        self.scale = self.head_dim ** -0.5
        modeling = importlib.import_module(type(hf_model).__module__)
        self._apply_rotary = modeling.apply_rotary_pos_emb

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        """input_ids/positions (T,) -> final hidden states (T, H)."""
        hidden = self.decoder.embed_tokens(input_ids)
        cos, sin = self.decoder.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0], sin[0]  # (T, D)
        tokens = input_ids.shape[0]
        for index, layer in enumerate(self.decoder.layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            query = attention.q_proj(normed).view(tokens, self.num_heads, self.head_dim)
            key = attention.k_proj(normed).view(tokens, self.num_kv_heads, self.head_dim)
            value = attention.v_proj(normed).view(tokens, self.num_kv_heads, self.head_dim)
            if hasattr(attention, "q_norm"):
                query, key = attention.q_norm(query), attention.k_norm(key)
            # (T, heads, D) with cos/sin (T, D): unsqueeze at dim 1 broadcasts over heads.
            query, key = self._apply_rotary(query, key, cos, sin, unsqueeze_dim=1)
            out = attend(index, query, key, value)  # (T, heads, D)
            hidden = hidden + attention.o_proj(out.reshape(tokens, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.decoder.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, V) float32."""
        return self.hf_model.get_output_embeddings()(hidden).float()
