"""Mixture-of-experts routers: finding them in an HF model, and the load-balancing loss.

HF's Qwen-family MoE blocks (Qwen3-MoE, Qwen2-MoE) keep the router as `mlp.gate`, whose
forward returns (router_logits (T, E), scores, indices (T, k)); the experts are HF's
own module (grouped GEMM by default, `experts_implementation="grouped_mm"`).

The load-balancing loss of one layer is Megatron's (switch-transformer) auxiliary loss,
without its coefficient:

    aux = E / (k T^2) * sum_e (sum_t p_te) * c_e

for T tokens, E experts, k experts per token, router probabilities p = softmax(logits)
and c_e the number of tokens routed to expert e. Perfectly even routing gives 1.

Routing replay (`RoutingReplay`, R3 of arXiv 2510.11370 and Miles' flags): a router can be
told which experts each token goes to (the engine's routes, or those recorded in an
earlier forward). Only the choice is replayed: the weights are the router's own softmax
probabilities gathered at the replayed experts, renormalised as the model renormalises
(`norm_topk_prob`), so gradients still reach the router (`replayed_routing`).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def is_moe(hf_model: nn.Module) -> bool:
    """Whether the model routes tokens to experts (Qwen-family MoE blocks)."""
    return bool(routers(hf_model))


def is_moe_block(mlp: nn.Module | None) -> bool:
    """Whether a decoder layer's mlp routes tokens to experts: a router `gate` with a
    weight and an `experts` module. The one test of an MoE layer: the trainer's routes,
    expert parallelism and the fast engine's layers all count the same layers."""
    return isinstance(getattr(mlp, "experts", None), nn.Module) \
        and hasattr(getattr(mlp, "gate", None), "weight")


def routers(hf_model: nn.Module) -> list[nn.Module]:
    """The router of every MoE layer (dense layers of a mixed model have none)."""
    layers = getattr(hf_model.base_model, "layers", ())
    return [layer.mlp.gate for layer in layers if is_moe_block(getattr(layer, "mlp", None))]


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


def replayed_routing(router_logits: torch.Tensor, replayed: torch.Tensor,
                     own: torch.Tensor, norm_topk_prob: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weights, experts) (T, k) of a softmax top-k router that sends token t to
    `replayed[t]` (T, k) instead of its own choice `own[t]`; a row of `replayed` holding
    a negative id keeps the router's own choice (a token with no recorded route).

        w_te = p_te / (sum_{e' in experts_t} p_te' if norm_topk_prob else 1),
        p = softmax(router_logits) in float32

    then cast to the logits' dtype, as HF's Qwen-MoE and Mixtral routers do."""
    experts = torch.where((replayed < 0).any(dim=-1, keepdim=True), own,
                          replayed.to(device=own.device, dtype=own.dtype))
    weights = router_logits.float().softmax(dim=-1).gather(1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


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

    def take(self, layers: Iterable[nn.Module] | None = None
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The routes recorded since the last `take` (of the routers of `layers` only,
        where given: decoder layers)."""
        chosen = self._routers if layers is None else \
            [layer.mlp.gate for layer in layers if is_moe_block(getattr(layer, "mlp", None))]
        routes = [router.__dict__.pop(ROUTES, None) for router in chosen]
        return [route for route in routes if route is not None]


def _record_routes(module: nn.Module, args, output) -> None:
    if torch.is_grad_enabled():
        router_logits, _, indices = output
        setattr(module, ROUTES, (router_logits, indices))


REPLAYED = "furlong_replayed_experts"  # attribute of a router: (T, k) experts to send tokens to
RECORDING = "furlong_recorded_experts"  # attribute of a router: [] to record into, or absent


class RoutingReplay:
    """Routing replay and route recording for every router of a model, by forward hooks.

    `replay(routes)` makes every later forward of the routers send token t of MoE layer
    l to `routes[t, l]` (int (T, num_moe_layers, k), the layers in model order) until the
    next `replay` call (`replay(None)`: the routers choose again). The routes stay set
    so that recomputation in a backward (activation checkpointing) routes as the forward
    did. `record()` keeps the experts each router uses in its next forward (replayed or
    its own, with or without gradients); `take_recorded()` returns them as (T,
    num_moe_layers, k) int32 on the CPU. Like `RouterRecorder`, the state is one slot per
    router on the router itself; the replay hook runs before any other forward hook, so a
    `RouterRecorder` sees the replayed experts. The hooks are added on first use, so a
    model that never replays or records runs (and compiles) exactly as before.
    """

    def __init__(self, hf_model: nn.Module):
        self._routers = routers(hf_model)
        self.num_layers = len(self._routers)  # MoE layers of the whole model
        self.columns = list(range(self.num_layers))  # each router's MoE layer
        self._hooked = False

    def keep_present(self, hf_model: nn.Module) -> None:
        """After layers of `hf_model` were deleted (a pipeline stage keeps its own): replay
        and record with the routers it still has, each under its MoE layer in the whole
        model (`columns`); routes given to `replay` still cover every MoE layer."""
        present = {id(router) for router in routers(hf_model)}
        kept = [(router, column) for router, column in zip(self._routers, self.columns,
                                                            strict=True)
                if id(router) in present]
        self._routers = [router for router, _ in kept]
        self.columns = [column for _, column in kept]

    def _hook(self) -> None:
        if not self._hooked:
            for router in self._routers:
                router.register_forward_hook(_replay_and_record, prepend=True)
            self._hooked = True

    def replay(self, routes: torch.Tensor | None) -> None:
        if routes is not None and routes.shape[1] != self.num_layers:
            raise ValueError(f"routes for {routes.shape[1]} MoE layers, but the model has "
                             f"{self.num_layers}")
        if routes is not None:
            self._hook()
        for column, router in zip(self.columns, self._routers, strict=True):
            router.__dict__.pop(REPLAYED, None)
            if routes is not None:
                setattr(router, REPLAYED, routes[:, column])

    def record(self) -> None:
        self._hook()
        for router in self._routers:
            setattr(router, RECORDING, [])

    def take_recorded(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """The experts of every token of the forwards since `record()` (in order), after
        `gather` (on the device) where given: (T, layers, k), the layers `columns` names."""
        per_layer = [torch.cat(router.__dict__.pop(RECORDING)) for router in self._routers]
        routes = torch.stack(per_layer, dim=1)
        if gather is not None:
            routes = gather(routes)
        return routes.to("cpu", torch.int32)  # one copy, one sync


def _replay_and_record(module: nn.Module, args, output):
    replayed = module.__dict__.get(REPLAYED)
    if replayed is not None:
        router_logits, _, own = output
        if replayed.shape[0] != own.shape[0]:
            raise ValueError(f"routes for {replayed.shape[0]} tokens replayed in a forward "
                             f"of {own.shape[0]}")
        weights, experts = replayed_routing(router_logits, replayed, own,
                                            getattr(module, "norm_topk_prob", True))
        output = (router_logits, weights, experts)
    recording = module.__dict__.get(RECORDING)
    if recording is not None:
        recording.append(output[2].detach())  # on the device: no sync per router
    return output
