"""Mixture-of-experts routers: finding them in an HF model, and the load-balancing loss.

HF's Qwen-family MoE blocks (Qwen3-MoE, Qwen2-MoE) keep the router as `mlp.gate`, whose
forward returns (router_logits (T, E), scores, indices (T, k)); the experts are HF's
own module (grouped GEMM by default, `experts_implementation="grouped_mm"`).

The load-balancing loss of one layer is Megatron's (switch-transformer) auxiliary loss,
without its coefficient:

    aux = E / (k T^2) * sum_e (sum_t p_te) * c_e

for T tokens, E experts, k experts per token, router probabilities p = softmax(logits)
and c_e the number of tokens routed to expert e. Perfectly even routing gives 1.
"""
from __future__ import annotations

import torch
from torch import nn


def is_moe(hf_model: nn.Module) -> bool:
    """Whether the model routes tokens to experts (Qwen-family MoE blocks)."""
    return bool(routers(hf_model))


def routers(hf_model: nn.Module) -> list[nn.Module]:
    """The router of every MoE layer (dense layers of a mixed model have none)."""
    layers = getattr(hf_model.base_model, "layers", ())
    return [layer.mlp.gate for layer in layers
            if hasattr(getattr(layer, "mlp", None), "experts") and hasattr(layer.mlp, "gate")]


def load_balancing_loss(router_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The formula above for one layer: logits (T, E), routed experts (T, k) -> scalar."""
    tokens, experts = router_logits.shape
    probs = router_logits.float().softmax(dim=-1)
    counts = torch.zeros(experts, device=probs.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    scale = experts / (indices.shape[-1] * tokens * tokens)
    return (probs.sum(dim=0) * counts).sum() * scale


def sequence_load_balancing_loss(router_logits: torch.Tensor, indices: torch.Tensor,
                                 cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """--moe-router-load-balancing-type seq_aux_loss: the loss of each packed sequence
    (bounds `cu_seq_lens`) on its own tokens, averaged over the sequences."""
    bounds = cu_seq_lens.tolist()
    return torch.stack([load_balancing_loss(router_logits[start:end], indices[start:end])
                        for start, end in zip(bounds[:-1], bounds[1:], strict=True)]).mean()


class RouterRecorder:
    """Records (router logits, routed experts) of every router forward (a forward hook on
    each router, registered once so that compiled layers keep their graphs); `take`
    returns the records since the last `take`, one per layer and forward. Call it before
    a forward to drop those of earlier ones (no-grad passes, recomputation)."""

    def __init__(self, hf_model: nn.Module):
        self._records: list[tuple[torch.Tensor, torch.Tensor]] = []
        for router in routers(hf_model):
            router.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args, output) -> None:
        router_logits, _, indices = output
        self._records.append((router_logits, indices))

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        records, self._records = self._records, []
        return records
