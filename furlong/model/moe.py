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


def freeze_routers(hf_model: nn.Module) -> None:
    """--moe-router-freeze-gate: no router weight is trained."""
    found = routers(hf_model)
    if not found:
        raise ValueError(f"--moe-router-freeze-gate: {type(hf_model).__name__} has no MoE "
                         "routers; drop the flag")
    for router in found:
        router.requires_grad_(False)


def load_balancing_loss(router_logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The formula above for one layer: logits (T, E), routed experts (T, k) -> scalar."""
    tokens, experts = router_logits.shape
    probs = router_logits.float().softmax(dim=-1)
    counts = torch.zeros(experts, device=probs.device).index_add_(
        0, indices.reshape(-1), torch.ones(indices.numel(), device=probs.device))
    scale = experts / (indices.shape[-1] * tokens * tokens)
    return (probs.sum(dim=0) * counts).sum() * scale


def sequence_load_balancing_loss(router_logits: torch.Tensor, indices: torch.Tensor,
                                 bounds: list[int]) -> torch.Tensor:
    """--moe-router-load-balancing-type seq_aux_loss: the loss of each packed sequence
    (token offsets `bounds`, cu_seq_lens as a list) on its own tokens, averaged over the
    sequences."""
    return torch.stack([load_balancing_loss(router_logits[start:end], indices[start:end])
                        for start, end in zip(bounds[:-1], bounds[1:], strict=True)]).mean()


ROUTES = "furlong_recorded_routes"  # attribute of a router: (logits, routed experts)


class RouterRecorder:
    """The routes of each router's last forward with gradients (training forwards and
    their recomputation in a backward; no-grad passes record nothing). A forward hook
    keeps them on the router itself, one slot per router, so that compiled layers see no
    changing Python state and keep one graph between them. `take` returns the routes
    recorded since the last `take`, in layer order, and clears them (call it after a
    backward too, or recomputed routes keep their graph alive)."""

    def __init__(self, hf_model: nn.Module):
        self._routers = routers(hf_model)
        for router in self._routers:
            router.register_forward_hook(_record_routes)

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        routes = [router.__dict__.pop(ROUTES, None) for router in self._routers]
        return [route for route in routes if route is not None]


def _record_routes(module: nn.Module, args, output) -> None:
    if torch.is_grad_enabled():
        router_logits, _, indices = output
        setattr(module, ROUTES, (router_logits, indices))
