"""The fast decoder's sparse MoE block (Qwen3-MoE) and the names its expert weights load by.

`SparseMoE` computes with the HF block's own parameters: the router `mlp.gate.weight`
and the experts' fused `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I), so a weight
update by HF name reaches it with nothing to rebuild. Routing is HF's: softmax over the
experts in float32, top-k, renormalised when `norm_topk_prob`, rounded to the dtype;
torch ops of fixed shapes, safe inside a CUDA graph. The experts run in the fused-MoE
kernels (`fused_moe.py`).

Checkpoints and trainers that export per expert name the weights
`...mlp.experts.{e}.gate_proj.weight` / `up_proj` / `down_proj`;
`load_weights` copies those into the slices of the fused parameters they stand for.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from furlong.engine.fast.fused_moe import fused_experts
from furlong.model.loading import load_named_tensors

_EXPERT_NAME = re.compile(
    r"(?P<experts>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<projection>gate|up|down)_proj\.weight")


def is_sparse_moe(mlp: nn.Module) -> bool:
    """Whether an HF decoder layer's mlp is a routed-experts block (Qwen3-MoE style)."""
    experts = getattr(mlp, "experts", None)
    return hasattr(experts, "gate_up_proj") and hasattr(getattr(mlp, "gate", None), "weight")


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


def expert_slice(params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The part of a fused expert parameter that per-expert `name` stands for; None when
    `name` is not a per-expert name. gate_up_proj holds [gate | up] along dim 1."""
    match = _EXPERT_NAME.fullmatch(name)
    if match is None or f"{match['experts']}.gate_up_proj" not in params:
        return None
    index = int(match["index"])
    if match["projection"] == "down":
        return params[f"{match['experts']}.down_proj"][index]
    gate_up = params[f"{match['experts']}.gate_up_proj"][index]  # (2I, H)
    half = gate_up.shape[0] // 2
    return gate_up[:half] if match["projection"] == "gate" else gate_up[half:]


@torch.no_grad()
def load_weights(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """`load_named_tensors`, also taking per-expert checkpoint names. Returns the count."""
    params = dict(model.named_parameters())
    count = 0

    def model_names():
        nonlocal count
        for name, tensor in named_tensors:
            target = expert_slice(params, name)
            if target is None:
                yield name, tensor
                continue
            if tensor.shape != target.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the "
                                 f"model's is {tuple(target.shape)}")
            target.copy_(tensor.to(target.device), non_blocking=True)
            count += 1

    return load_named_tensors(model, model_names()) + count
