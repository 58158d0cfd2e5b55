"""Context parallelism (--context-parallel-size C): every packed micro-batch split along
the sequence over C ranks, attention by Ulysses all-to-alls, log-probs and entropy
gathered back whole on each of them.

Why Ulysses (DeepSpeed-Ulysses; verl's sequence parallelism) rather than ring attention:
- Packed variable-length rows. After the all-to-all a rank holds the whole packed row for
  1/C of the heads, so the packed attention of model/varlen.py (the flash varlen kernel
  on GPU, SDPA on the CPU) runs unchanged with the bounds of the whole row. PyTorch's ring
  attention (`context_parallel`) is SDPA-only and knows no packing; a varlen ring needs a
  kernel of its own.
- Balance. Attention is split by heads, so every rank does the same attention work
  whatever the sample lengths; everything else in a layer is per token, and the row is
  cut into C equal contiguous parts. No zig-zag reordering, no causal imbalance.
- Cost: four all-to-alls per layer (q, k, v out; the output back), each moving 1/C of
  the rank's activations, against C - 1 key/value steps of a ring.
The limit: C must divide the query heads of a rank (num_attention_heads /
--tensor-model-parallel-size); refused otherwise, naming the flag (ring attention would
lift it and is not implemented). Fewer key/value heads than C are repeated first: each
KV head lcm(KV heads, C) / KV heads times, so that every rank receives the KV heads its
query heads read (the grouping of grouped-query attention is kept).

Layout. The mesh is ("dp", "cp", "tp"), tensor-parallel innermost. The C ranks of one
data-parallel rank get the same samples (like tensor-parallel ranks), and rank r of them
holds tokens [r T', (r + 1) T') of each packed row of T tokens, T' = ceil(T / C): the row
is padded to C T' with token 0 at position 0, the padding a sequence of its own in
`cu_seq_lens` so that no sample attends to it. Position ids are the samples' own, so
rotary embeddings are those of the whole row. Targets are read from the whole row before
the split (every rank has the whole batch), so the target of a part's last token, the
first token of the next part, needs no communication.

Log-probs. Each rank runs the fused head at the target positions in its part; the (N,)
log-probs and entropy are all-gathered over the C ranks, so each holds the micro-batch's
values and computes the same, unchanged objective (sequence-level terms included). The
gather's backward keeps the rank's own slice of the gradient: the C identical losses are
one loss, and each rank differentiates its own tokens' part of it.

Gradients. FSDP2 shards parameters over the flattened ("dp", "cp") mesh ("dp_cp") and
averages gradients over its dp x cp ranks, while each rank's backward holds the gradient
of its own tokens only; the trainer scales the loss by dp x cp, so the average is the
sum (actor._backward). The optimizer shards are those of dp x cp data-parallel ranks:
a checkpoint saved under C = 2 resumes under C = 1 on as many ranks, and back.

MoE models. Each rank's routers route its part's tokens; routes given for the whole row
(routing replay) are cut to the part (`local`), and those recorded, or read by the
load-balancing loss, gathered back whole (`whole`; its backward keeps the rank's part).
Routers and experts are FSDP-sharded over "dp_cp" like every parameter, so their
gradients add up the parts; with expert parallelism an expert slice is sharded over the
ranks holding it times "cp" ("edp_cp"), and a rank exchanges tokens with the ranks of
its expert group that hold the same part of other rows. Expert groups may also take
context-parallel ranks (expert_parallel.py): each rank of such a group routes its own part
(or, with tensor parallelism, its sequence slice of the part).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from furlong.model.attention import CONTEXT_PARALLEL
from furlong.model.moe import is_moe
from furlong.train.batch import PackedMicroBatch

PADDING_TOKEN = 0


def check_context_parallel_size(world_size: int, tp_size: int, cp_size: int) -> None:
    """The trainer ranks are dp x cp x tp."""
    if cp_size < 1 or world_size % (tp_size * cp_size):
        raise ValueError(f"--context-parallel-size {cp_size} x --tensor-model-parallel-size "
                         f"{tp_size} does not divide the {world_size} trainer ranks: the ranks "
                         "are data x context x tensor parallel; choose sizes whose product "
                         "divides the trainer's world size")


def check_heads(num_heads: int, tp_size: int, cp_size: int) -> None:
    """Ulysses splits each tensor-parallel rank's query heads over the C ranks."""
    if cp_size > 1 and (num_heads % tp_size or (num_heads // tp_size) % cp_size):
        raise ValueError(f"--context-parallel-size {cp_size}: the model's {num_heads} attention "
                         f"heads over --tensor-model-parallel-size {tp_size} do not split "
                         f"over {cp_size} context-parallel ranks; choose a context-parallel "
                         f"size that divides {num_heads // max(tp_size, 1)} (heads per "
                         "tensor-parallel rank)")


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place among the C ranks that share each micro-batch."""
    group: dist.ProcessGroup
    rank: int
    size: int

    # ---- the micro-batch ---------------------------------------------------------------
    def target_bounds(self, micro: PackedMicroBatch) -> list[int]:
        """(C + 1,) offsets into the (N,) targets: rank r's are [bounds[r], bounds[r+1])
        (target positions increase along the row)."""
        edges = torch.arange(self.size + 1, device=micro.target_positions.device)
        return torch.searchsorted(micro.target_positions,
                                  edges * self.local_rows(micro.num_tokens)).tolist()

    def shard(self, micro: PackedMicroBatch) -> PackedMicroBatch:
        """This rank's part of `micro`: its T' tokens and the targets among them (target
        positions relative to the part); `cu_seq_lens` and `max_length` stay those of the
        whole (padded) row, which the attention sees after the all-to-all."""
        length = self.local_rows(micro.num_tokens)
        padding = length * self.size - micro.num_tokens
        start = self.rank * length
        bounds = self.target_bounds(micro)
        mine = slice(bounds[self.rank], bounds[self.rank + 1])
        cu_seq_lens = micro.cu_seq_lens
        if padding:
            cu_seq_lens = torch.cat([cu_seq_lens, cu_seq_lens[-1:] + padding])
        part = slice(start, start + length)
        return replace(
            micro, input_ids=F.pad(micro.input_ids, (0, padding), value=PADDING_TOKEN)[:, part],
            position_ids=F.pad(micro.position_ids, (0, padding))[:, part],
            target_positions=micro.target_positions[mine] - start,
            targets=micro.targets[mine], sample_ids=micro.sample_ids[mine],
            cu_seq_lens=cu_seq_lens, max_length=max(micro.max_length, padding),
            token_fields={name: values[mine] for name, values in micro.token_fields.items()})

    def gather(self, micro: PackedMicroBatch, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's (N_r,) values at its targets -> (N,) of the whole micro-batch, on
        every rank of the group, for each of `values` (one all-gather for all)."""
        bounds = self.target_bounds(micro)
        counts = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        return _GatherTargets.apply(counts, self, *values)

    # ---- per-token rows (MoE routes) ------------------------------------------------------
    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of per-token `whole` (T, ...): its part's T' tokens, -1 for
        the padding (routes: the router chooses there)."""
        length = -(-whole.shape[0] // self.size)
        padding = length * self.size - whole.shape[0]
        padded = F.pad(whole, (0, 0) * (whole.dim() - 1) + (0, padding), value=-1)
        return padded[self.rank * length:(self.rank + 1) * length]

    def local_rows(self, num_tokens: int) -> int:
        """T' = ceil(T / C): a part, padding included, has as many rows as every other."""
        return -(-num_tokens // self.size)

    def whole(self, local: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Every rank's rows of a row of `num_tokens` (the padding dropped), on every rank;
        a gradient comes back to each rank as its part's."""
        return _GatherRows.apply(self, local)[:num_tokens]

    # ---- attention (called by model/attention.py) -----------------------------------------
    def scatter_heads(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T', H, D) per rank -> (C T', H / C, D): the whole row, this rank's heads. KV
        heads are repeated first when C does not divide them (module docstring)."""
        num_kv_heads = key.shape[1]
        repeat = math.lcm(num_kv_heads, self.size) // num_kv_heads
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        return tuple(self._sequence_to_heads(x) for x in (query, key, value))

    def _sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        length, heads, dim = x.shape
        # (C, T', H/C, D): head group j goes to rank j; rank i's tokens come back i-th.
        parts = x.reshape(length, self.size, heads // self.size, dim).transpose(0, 1)
        received = all_to_all_single_autograd(parts.contiguous(), None, None, self.group)
        return received.reshape(self.size * length, heads // self.size, dim)

    def gather_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(C T', H / C, D) -> (T', H, D): the inverse of `scatter_heads` for the output."""
        length, heads, dim = out.shape
        # Rank i's tokens go to rank i; head group j of this rank's tokens comes back j-th.
        received = all_to_all_single_autograd(out.contiguous(), None, None, self.group)
        parts = received.reshape(self.size, length // self.size, heads, dim).transpose(0, 1)
        return parts.reshape(length // self.size, self.size * heads, dim)


class _GatherTargets(torch.autograd.Function):
    """All-gather of per-target values of uneven counts; the backward keeps this rank's
    slice (every rank computes the same loss from the gathered values: see the module
    docstring)."""

    @staticmethod
    def forward(ctx, counts: list[int], cp: ContextParallel, *values: torch.Tensor):
        stacked = torch.stack(values)  # (V, N_r)
        # At least one column: a micro-batch may have no targets at all.
        padded = F.pad(stacked, (0, max(*counts, 1) - stacked.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=cp.group)
        ctx.mine = slice(sum(counts[:cp.rank]), sum(counts[:cp.rank + 1]))
        # One new tensor per value (not views of one: FSDP's root output hooks want none).
        return tuple(torch.cat([part[index, :count] for part, count
                                in zip(parts, counts, strict=True)])
                     for index in range(len(values)))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return None, None, *(grad[ctx.mine] for grad in grads)


class _GatherRows(torch.autograd.Function):
    """All-gather of equal parts along dim 0; the backward keeps this rank's part (as
    `_GatherTargets`)."""

    @staticmethod
    def forward(ctx, cp: ContextParallel, local: torch.Tensor):
        parts = [torch.empty_like(local) for _ in range(cp.size)]
        dist.all_gather(parts, local.contiguous(), group=cp.group)
        ctx.mine = slice(cp.rank * local.shape[0], (cp.rank + 1) * local.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad[ctx.mine]


def apply_context_parallel(policy: nn.Module, cp_mesh: DeviceMesh, tp_size: int) -> None:
    """Make `policy` (a CausalLMPolicy) compute its micro-batches split over `cp_mesh`:
    the policy shards and gathers, each attention module exchanges heads for sequence;
    an MoE model's routes go between the row and the parts."""
    hf_model = policy.hf_model
    check_heads(hf_model.config.num_attention_heads, tp_size, cp_mesh.size())
    layout = ContextParallel(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size())
    policy.context_parallel = layout
    if is_moe(hf_model):
        policy.row_parts = layout
    for layer in hf_model.base_model.layers:
        setattr(layer.self_attn, CONTEXT_PARALLEL, layout)
