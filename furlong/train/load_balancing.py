"""The MoE load-balancing term of a micro-batch's loss (--moe-aux-loss-coeff and
--moe-router-load-balancing-type), from the routes its forward recorded.

Per layer, the loss of model/moe.py over the micro-batch (aux_loss) or averaged over
its sequences (seq_aux_loss); the term is the coefficient times their sum over layers
(Megatron adds each layer's), as the micro-batch's share of the step. The logged
moe_aux_loss is the layers' mean, without the coefficient. With pipeline stages each stage
adds its layers' term to what its chunks send (pipeline_parallel.py), and the logged
shares of the stages are summed. sinkhorn and none add
nothing (the config warns when a coefficient is set with them; it refuses global_aux_loss
and sigmoid routers with a coefficient).
"""
from __future__ import annotations

import torch

from furlong.config.groups import ModelArgs
from furlong.model.moe import load_balancing_loss, sequence_load_balancing_loss
from furlong.train.batch import PackedMicroBatch

ADDS_A_LOSS = ("aux_loss", "seq_aux_loss")


def load_balancing_term(routes: list[tuple[torch.Tensor, torch.Tensor]], model: ModelArgs,
                        micro: PackedMicroBatch, share: torch.Tensor, num_layers: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(term to add to the loss, moe_aux_loss share to log) of one forward's `routes`
    ((router logits, routed experts) per layer) on `micro`, whose share of the step's
    loss is `share`; the model has `num_layers` MoE layers (more than `routes` on a
    pipeline stage: the stages' logged shares add up to the model's)."""
    balancing = model.moe_router_load_balancing_type
    if not routes:  # a pipeline stage of dense layers
        zero = torch.zeros((), device=share.device)
        return zero, zero
    if balancing == "seq_aux_loss":
        bounds = micro.cu_seq_lens.tolist()  # once: a device sync on a GPU
        layer_losses = [sequence_load_balancing_loss(logits, routed, bounds)
                        for logits, routed in routes]
    else:
        layer_losses = [load_balancing_loss(logits, routed) for logits, routed in routes]
    losses = torch.stack(layer_losses)
    logged = losses.detach().sum() / num_layers * share.detach()
    if balancing not in ADDS_A_LOSS:
        return torch.zeros((), device=share.device), logged
    return model.moe_aux_loss_coeff * losses.sum() * share, logged
