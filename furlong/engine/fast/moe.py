"""The fast decoder's sparse MoE block (Qwen3-MoE) and the names its expert weights load by.

`SparseMoE` computes with the HF block's own parameters: the router `mlp.gate.weight`
and the experts' fused `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), so a weight
update by HF name reaches it with nothing to rebuild. Routing is HF's: softmax over the
experts in float32, top-k, renormalised when `norm_topk_prob`, rounded to the dtype;
torch ops of fixed shapes, safe inside a CUDA graph. The experts run in the fused-MoE
kernels (`fused_moe.py`).

Weights pushed under the checkpoint's per-expert names (`...mlp.experts.{e}.gate_proj.weight`
...) land in the slices of the fused parameters they stand for
(`model.loading.load_named_tensors`).
"""
from __future__ import annotations

import torch
from torch import nn

from furlong.engine.fast.fused_moe import fused_experts


class SparseMoE:
    def __init__(self, block: nn.Module, config):
        self.router = block.gate
        self.experts = block.experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (T, H) -> routing weights (T, k) in the dtype, expert ids (T, k) int64."""
        logits = nn.functional.linear(hidden, self.router.weight)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), expert_ids

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (T, H) -> the block's output (T, H) and the chosen experts (T, k)."""
        weights, expert_ids = self.route(hidden)
        out = fused_experts(hidden, self.experts.gate_up_proj, self.experts.down_proj,
                            expert_ids, weights)
        return out, expert_ids
