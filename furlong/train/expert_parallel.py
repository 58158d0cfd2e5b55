"""Expert parallelism: each MoE layer's experts split over the "ep" ranks, every routed
token sent to the rank that owns its expert and its result sent back (all-to-all).

Layouts (Megatron's, with expert tensor parallelism 1). When ep divides the dp
data-parallel ranks, expert-parallel ranks are carved from them: the ("dp", "cp", "tp")
mesh is seen as ("edp", "ep", "cp", "tp"), dp = edp x ep, and tensor-parallel ranks of
one data-parallel rank, which see the same tokens, each run the MoE layer whole,
exchanging tokens with the ranks of the same "tp" index. Otherwise (Miles' Qwen3-30B-A3B:
tp 4 x ep 8 on 8 ranks; Qwen3-235B-A22B: tp 4 x cp 2 x ep 8) the expert groups are
adjacent ranks of the whole (dp, cp, tp) grid (of each pipeline stage), a mesh ("edp",
"ep") of their own, context- and tensor-parallel ranks included. Context-parallel ranks
hold different parts of a row already; with --sequence-parallel each tensor-parallel
rank runs the MoE block on its own slice of the row (of its part), so the ranks of a
group hold different tokens; the router's (and any shared expert's) gradient, now a sum
over the slices, is summed over "tp" before the optimizer step
(`sum_moe_block_gradients`), and per-token routes (replayed, recorded, or read by the
load-balancing loss) go between whole rows and slices through `RowSlices` (nested in
the context-parallel parts: `NestedRowParts`). Either way the ep ranks of one expert
group hold different experts (rank i the experts [i E/ep, (i+1) E/ep) of E, as slices
of HF's fused `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I): DTensors sharded
over "ep"), and FSDP2 shards those slices further over the edp ranks that hold the same
experts (times "cp" when the groups are data-parallel ranks: context-parallel ranks then
hold the same experts and route other tokens). Every other parameter stays
FSDP2-sharded over all dp (dp x cp) ranks.

Forward of one MoE layer on one rank, for T tokens routed to k experts each
(`dispatched_experts_forward`):
  1. the T k (token, expert) pairs sorted by expert; experts are numbered by owner, so
     the sort also groups the pairs by destination rank;
  2. the count of pairs per expert exchanged (all-to-all of E integers), so that each
     rank knows how many rows it receives for each of its experts from each rank;
  3. the rows exchanged (autograd all-to-all: the backward sends the gradients back the
     way the rows came);
  4. the received rows regrouped by local expert and run through the local experts with
     the grouped GEMM of HF's experts (`_grouped_linear`, with its CPU fallback);
  5. the results sent back (all-to-all), put back in pair order, weighted by the
     router's top-k weights and summed per token, as HF's grouped_mm forward does (the
     weights are applied on the token's own rank, so router gradients stay local).

Gradient scale: the trainer scales each rank's loss by dp and FSDP averages gradients
over the ranks that share a parameter. An expert slice collects the gradients of the
tokens of all ep ranks of its group and is averaged over its edp ranks only, so its
gradient would be ep times the global one when a group covers ep data-parallel ranks'
tokens (ep / tp times when it covers sequence slices of tensor-parallel ranks, whatever
the context-parallel ranks it covers: the loss is scaled by dp x cp then); the
local slice's gradient is scaled by the inverse (`expert_gradient_scale`) in the
forward (`_ScaleGradient`) to make it the same sum as every other parameter's.
"""
from __future__ import annotations

import functools
from typing import Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.tensor import DTensor, Replicate, Shard
from transformers.integrations.moe import _grouped_linear

from furlong.model.moe import is_moe_block
from furlong.train.distributed_state import sum_gradient

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # HF's fused expert tensors, experts first


def groups_beyond_data_parallel(ep_size: int, dp_size: int) -> bool:
    """Whether expert groups take tensor- or context-parallel ranks too (ep does not
    divide dp)."""
    return dp_size % ep_size != 0


def moe_blocks_on_slices(ep_size: int, dp_size: int, tp_size: int) -> bool:
    """Whether each tensor-parallel rank runs its MoE blocks on its sequence slice: expert
    groups that take tensor-parallel ranks (which would otherwise hold the same tokens)."""
    return ep_size > 1 and tp_size > 1 and groups_beyond_data_parallel(ep_size, dp_size)


def expert_gradient_scale(ep_size: int, dp_size: int, tp_size: int) -> float:
    """1 / how many data-parallel ranks' tokens one expert group sees."""
    return tp_size / ep_size if groups_beyond_data_parallel(ep_size, dp_size) else 1 / ep_size


def check_expert_layout(ep_size: int, dp_size: int, tp_size: int, sequence_parallel: bool,
                        cp_size: int = 1) -> None:
    """Expert groups tile the data-parallel ranks of a stage or its whole (dp, cp, tp)
    grid; groups that take tensor-parallel ranks need --sequence-parallel. A ValueError
    naming the flag and the fix otherwise."""
    ranks = dp_size * cp_size * tp_size
    if ep_size < 1 or ranks % ep_size:
        raise ValueError(f"--expert-model-parallel-size {ep_size} does not divide the {ranks} "
                         "trainer ranks of a stage (data- x context- x tensor-parallel): "
                         "choose a divisor of that number")
    if moe_blocks_on_slices(ep_size, dp_size, tp_size) and not sequence_parallel:
        raise ValueError(f"--expert-model-parallel-size {ep_size} over {dp_size} data-parallel "
                         f"ranks x --tensor-model-parallel-size {tp_size}: expert groups take "
                         "tensor-parallel ranks too, each running the MoE block on its "
                         "sequence slice; add --sequence-parallel (as Megatron requires), or "
                         f"choose an expert-parallel size dividing {dp_size}")


def expert_modules(layers: Iterable[nn.Module]) -> list[nn.Module]:
    """The experts module of each MoE decoder layer (dense layers have none)."""
    return [layer.mlp.experts for layer in layers if is_moe_block(getattr(layer, "mlp", None))]


def apply_expert_parallel(layers: nn.ModuleList, ep_mesh: DeviceMesh,
                          gradient_scale: float) -> None:
    """Keep this rank's experts of every MoE layer (1/ep of each expert tensor) and make
    the layer dispatch its tokens to the owners of their experts (their gradient scaled
    by `expert_gradient_scale`)."""
    found = expert_modules(layers)
    size = ep_mesh.size()
    if not found:
        raise ValueError(f"--expert-model-parallel-size {size}: the model has no MoE layers "
                         "(no experts to split); set it to 1")
    for experts in found:
        _check_supported(experts, size)
        for name in EXPERT_WEIGHTS:
            setattr(experts, name, _expert_shard(getattr(experts, name), ep_mesh))
        experts.forward = functools.partial(dispatched_experts_forward, experts,
                                            ep_mesh.get_group(), gradient_scale)


def _check_supported(experts: nn.Module, ep_size: int) -> None:
    num_experts = experts.gate_up_proj.shape[0]
    if num_experts % ep_size:
        raise ValueError(f"--expert-model-parallel-size {ep_size} does not divide the model's "
                         f"{num_experts} experts: choose a divisor of num_experts")
    layout = (getattr(experts, "has_gate", False), getattr(experts, "has_bias", True),
              getattr(experts, "is_transposed", True))
    if layout != (True, False, False) or not all(hasattr(experts, n) for n in EXPERT_WEIGHTS):
        raise ValueError(f"--expert-model-parallel-size {ep_size}: {type(experts).__name__} "
                         "is not laid out as Qwen-MoE experts (fused gate_up_proj and "
                         "down_proj, no bias); set it to 1")


def _expert_shard(full: nn.Parameter, ep_mesh: DeviceMesh) -> nn.Parameter:
    """This rank's experts of `full` (E, ...), a DTensor sharded over "ep" by expert. A
    copy, so that the full tensor is freed."""
    local = full.detach().chunk(ep_mesh.size())[ep_mesh.get_local_rank()]
    local = local.to(ep_mesh.device_type, copy=True)
    shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False,
                               shape=full.shape, stride=full.stride())
    return nn.Parameter(shard, requires_grad=full.requires_grad)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def dispatched_experts_forward(experts: nn.Module, group: dist.ProcessGroup,
                               gradient_scale: float, hidden: torch.Tensor,
                               top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor) -> torch.Tensor:
    """HF's experts forward over the expert group: hidden (T, H), top_k_index and
    top_k_weights (T, k) -> (T, H). Collective over `group` (steps 1-5 above)."""
    ep_size = group.size()
    gate_up, down = (_ScaleGradient.apply(getattr(experts, name).to_local(), gradient_scale)
                     for name in EXPERT_WEIGHTS)  # (E/ep, 2I, H), (E/ep, H, I)
    num_local, top_k = gate_up.shape[0], top_k_index.shape[1]
    expert_ids = top_k_index.reshape(-1)  # (T k,)
    order = torch.argsort(expert_ids, stable=True)
    sent_per_expert = torch.bincount(expert_ids, minlength=num_local * ep_size)  # (E,)
    received_per_expert = torch.empty_like(sent_per_expert)  # (ep x E/ep): source, expert
    dist.all_to_all_single(received_per_expert, sent_per_expert, group=group)
    received_per_expert = received_per_expert.view(ep_size, num_local)
    send_splits = sent_per_expert.view(ep_size, num_local).sum(dim=1).tolist()
    receive_splits = received_per_expert.sum(dim=1).tolist()
    received = _exchange(hidden[order // top_k], receive_splits, send_splits, group)
    outputs = _local_experts(experts, received, received_per_expert, gate_up, down)
    returned = _exchange(outputs, send_splits, receive_splits, group)  # (T k, H) in `order`
    pair_outputs = returned[torch.argsort(order)]
    weighted = pair_outputs * top_k_weights.reshape(-1, 1)
    return weighted.view(-1, top_k, hidden.shape[-1]).sum(dim=1).to(hidden.dtype)


def _exchange(rows: torch.Tensor, receive_splits: list[int], send_splits: list[int],
              group: dist.ProcessGroup) -> torch.Tensor:
    """Rows [sum(send_splits), H] out, [sum(receive_splits), H] in, by rank of `group`."""
    return all_to_all_single_autograd(rows.contiguous(), receive_splits, send_splits, group)


def _local_experts(experts: nn.Module, rows: torch.Tensor, rows_per_expert: torch.Tensor,
                   gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The local experts on `rows` (R, H), which arrive by source rank, then by local
    expert (`rows_per_expert` (ep, E/ep)); the results come back in the same order."""
    num_sources, num_local = rows_per_expert.shape
    local_ids = torch.arange(num_local, device=rows.device).repeat(num_sources)
    regroup = torch.argsort(local_ids.repeat_interleave(rows_per_expert.reshape(-1)),
                            stable=True)  # (R,): rows by local expert
    offsets = torch.cumsum(rows_per_expert.sum(dim=0), dim=0, dtype=torch.int32)
    projected = experts._apply_gate(_grouped_linear(rows[regroup], gate_up, offsets))
    outputs = _grouped_linear(projected, down, offsets)  # (R, H), by local expert
    return outputs[torch.argsort(regroup)]


def sum_moe_block_gradients(layers: Iterable[nn.Module], tp_group: dist.ProcessGroup) -> None:
    """Expert groups across tensor-parallel ranks: each rank's MoE blocks saw its sequence
    slice only, so the gradients of their parameters outside the experts (router, shared
    experts) are partial sums; add them up over "tp" (FSDP has averaged each over "dp")."""
    for layer in layers:
        if not is_moe_block(getattr(layer, "mlp", None)):
            continue
        for name, param in layer.mlp.named_parameters():
            if param.grad is not None and not name.startswith("experts."):
                sum_gradient(param.grad, tp_group)


class RowSlices:
    """Expert groups across tensor-parallel ranks: a micro-batch's per-token rows (dim 0)
    as this rank's sequence slice (the one sequence parallelism gives its MoE blocks)
    and back. Ranks slice as DTensor's Shard does, so uneven rows split alike."""

    def __init__(self, tp_mesh: DeviceMesh):
        self.mesh = tp_mesh

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of `whole` (no communication)."""
        replicated = DTensor.from_local(whole, self.mesh, [Replicate()], run_check=False)
        return replicated.redistribute(self.mesh, [Shard(0)]).to_local()

    def local_rows(self, num_tokens: int) -> int:
        """How many rows of a row of `num_tokens` are this rank's (torch.chunk's split)."""
        size = -(-num_tokens // self.mesh.size())
        return max(0, min(size, num_tokens - self.mesh.get_local_rank() * size))

    def whole(self, local: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Every rank's rows, in order, on every rank; a gradient comes back to each rank
        as its slice's."""
        shape = (num_tokens, *local.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride).full_tensor()


class NestedRowParts:
    """Rows of a part of a row: `inner`'s split of `outer`'s part (a tensor-parallel
    rank's sequence slice of its context-parallel part)."""

    def __init__(self, outer: "RowParts", inner: "RowParts"):
        self.outer, self.inner = outer, inner

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        return self.inner.local(self.outer.local(whole))

    def local_rows(self, num_tokens: int) -> int:
        return self.inner.local_rows(self.outer.local_rows(num_tokens))

    def whole(self, local: torch.Tensor, num_tokens: int) -> torch.Tensor:
        part = self.inner.whole(local, self.outer.local_rows(num_tokens))
        return self.outer.whole(part, num_tokens)


class RowParts(Protocol):
    """How a row's per-token values map to the tokens this rank's MoE blocks see:
    `RowSlices` (expert groups across tensor-parallel ranks) or
    context_parallel.ContextParallel."""

    def local(self, whole: torch.Tensor) -> torch.Tensor: ...

    def local_rows(self, num_tokens: int) -> int: ...

    def whole(self, local: torch.Tensor, num_tokens: int) -> torch.Tensor: ...


def whole_row_routes(routes: list[tuple[torch.Tensor, torch.Tensor]], parts: RowParts,
                     num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (router logits, experts) each MoE layer recorded for this rank's part of a
    row of `num_tokens`, gathered whole on every rank (the load-balancing loss reads the
    whole row)."""
    return [(parts.whole(logits, num_tokens), parts.whole(experts, num_tokens))
            for logits, experts in routes]
