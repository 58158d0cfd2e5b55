"""--pipeline-model-parallel-size: the decoder layers split into stages over the "pp"
ranks, run by `torch.distributed.pipelining` (1F1B; interleaved 1F1B with virtual
stages). Which layers each rank holds (equal stages, uneven first/last stages, virtual
stages) is `pipeline_layout.py`'s arithmetic.

A stage is the policy with the other stages' layers deleted (as torchtitan does): the
first keeps the embeddings, the last the final norm and the fused log-prob head; a tied
embedding/output weight lives on both, and its gradients are summed between them. The
layers keep their HF names (`global_name`), so checkpoints and weight pushes are the
same as one rank's. With virtual stages a rank holds several model chunks (chunks r,
r + P, ...: their layers are not consecutive); it still is one model, and the schedule
gets one `PipelineStage` per chunk, whose forward runs a view of the decoder holding
that chunk's layers only (`chunk_decoder`).

Micro-batches: the dynamic-batching (or fixed) micro-batches of a data-parallel rank's
step go through one schedule step. They are packed rows of different lengths, and a
schedule sends tensors of one shape, so each is padded at the stage boundary to the
longest row of the step: a stage runs its layers on the real row (the packed attention
never sees the padding) and zero-pads what it sends. Each schedule step therefore
builds its `PipelineStage` with the step's shapes (no shape inference, no extra
forward). Every stage receives the index of the micro-batch it runs as a keyword
argument, and finds the packing (positions, sequence boundaries, targets) in the list
all ranks of a pipeline hold (they see the same samples). The last stage's loss
function computes the objective with the step's global denominators and collects the
log-probs; they are broadcast to the other stages. 1F1B needs at least as many
micro-batches as stages, interleaved 1F1B a count that its rounds divide; a step whose
count does not fit runs GPipe, or looped BFS with virtual stages (the same result:
`schedule_class`).

Within a stage: the ranks of a stage are a ("dp", "cp", "tp") mesh like a whole trainer's,
and rank (dp, cp, tp) of stage s sends to rank (dp, cp, tp) of stage s + 1. Tensor
parallelism needs nothing more (ranks of a group hold the same whole rows); sequence
parallelism slices each chunk's input (`tensor_parallel.apply_tensor_parallel`'s
entry layers) and the chunk gathers its output back into whole rows before sending;
context parallelism sends each rank's part of the row (hidden states padded to the
step's longest part), and the last chunk gathers the log-probs whole, as without stages.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                         ScheduleInterleaved1F1B, ScheduleLoopedBFS)
from torch.distributed.tensor import DTensor

from furlong.train.batch import PackedMicroBatch
from furlong.train.distributed_state import full_tensor, sum_gradient


# ---- the layout ---------------------------------------------------------------------------
@dataclass
class PipelineRole:
    """What a pipeline rank of the policy runs: its place, and the global layers of each
    model chunk it holds (one chunk, or several with virtual stages: `pipeline_layout`).
    `running` is the local number of the chunk the policy's next forward runs (set by the
    schedule's stage module just before it calls the policy)."""
    stage_index: int
    num_stages: int
    chunks: list[range]
    running: int = 0

    @property
    def layers(self) -> list[int]:
        """The global index of each layer this rank holds, in its local order."""
        return [layer for chunk in self.chunks for layer in chunk]

    @property
    def num_chunks(self) -> int:
        """Model chunks in the whole pipeline (stages x virtual stages)."""
        return self.num_stages * len(self.chunks)

    def chunk_index(self, local: int) -> int:
        """The model-order index of this rank's `local`-th chunk."""
        return self.stage_index + local * self.num_stages

    def chunk_slice(self, local: int) -> slice:
        """The local indices of the layers of this rank's `local`-th chunk."""
        start = sum(len(chunk) for chunk in self.chunks[:local])
        return slice(start, start + len(self.chunks[local]))

    @property
    def is_first(self) -> bool:
        """Holds chunk 0 (the embeddings)."""
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        """Holds the last chunk (the final norm and the head)."""
        return self.stage_index == self.num_stages - 1

    def global_name(self, name: str) -> str:
        """A parameter's HF name in the whole model (layers are renumbered in a stage)."""
        parts = name.split(".")
        for i in range(len(parts) - 2):
            if parts[i] == "layers" and parts[i + 1].isdigit():
                parts[i + 1] = str(self.layers[int(parts[i + 1])])
                break
        return ".".join(parts)


def split_stage(hf_model: nn.Module, role: PipelineRole) -> None:
    """Delete, in place, what the stage `role` does not run."""
    decoder = hf_model.base_model
    decoder.layers = nn.ModuleList(decoder.layers[i] for i in role.layers)
    if not role.is_first:
        decoder.embed_tokens = None
    if not role.is_last:
        decoder.norm = nn.Identity()
        if not role.is_first or not hf_model.config.tie_word_embeddings:
            hf_model.lm_head = None


def chunk_decoder(decoder: nn.Module, role: PipelineRole, local: int) -> nn.Module:
    """The HF decoder of a stage seen as its `local`-th chunk only: a shallow copy whose
    `layers` are that chunk's and whose final norm is the identity unless the chunk is
    the model's last. It shares every parameter and module, so FSDP and checkpoints
    still see one model per rank."""
    if len(role.chunks) == 1:
        return decoder
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    view.layers = decoder.layers[role.chunk_slice(local)]
    if role.chunk_index(local) != role.num_chunks - 1:
        view.norm = nn.Identity()
    return view


def tied_weight(hf_model: nn.Module, role: PipelineRole) -> nn.Parameter | None:
    """The embedding/output weight a first and a last stage both hold (tied embeddings)."""
    if role.num_stages == 1 or not hf_model.config.tie_word_embeddings:
        return None
    if role.is_first:
        return hf_model.base_model.embed_tokens.weight
    return hf_model.lm_head.weight if role.is_last else None


def stage_forward(policy, micro: PackedMicroBatch, temperature: float,
                  activations: torch.Tensor, sent_length: int) -> torch.Tensor:
    """One chunk of `policy` (a CausalLMPolicy whose `pipeline` is set; the chunk its
    `running` names) on a micro-batch: the first chunk reads the micro-batch's ids,
    the others (1, T, H) hidden states, real rows padded to the step's length T; a
    chunk sends (1, T, H) hidden states, zero past the row, or, the last, (2, T) log-
    probs and entropy, zero past the targets (`sent_length` is that T). With context
    parallelism a rank's rows are its part of the micro-batch (T: the longest part) and
    the last chunk gathers the values whole; with sequence parallelism a chunk sends
    whole rows (its output gathered over the tensor-parallel ranks)."""
    role, context_parallel = policy.pipeline, policy.context_parallel
    part = micro if context_parallel is None else context_parallel.shard(micro)
    length, chunk = part.input_ids.shape[1], role.chunk_index(role.running)
    inputs = dict(input_ids=part.input_ids) if chunk == 0 \
        else dict(inputs_embeds=activations[:, :length])
    decoder = chunk_decoder(policy.hf_model.base_model, role, role.running)
    hidden = decoder(
        **inputs, position_ids=part.position_ids, use_cache=False,
        cu_seq_lens_q=part.cu_seq_lens, cu_seq_lens_k=part.cu_seq_lens,
        max_length_q=part.max_length, max_length_k=part.max_length).last_hidden_state
    if isinstance(hidden, DTensor):  # sequence slices
        hidden = hidden.full_tensor()
    if chunk != role.num_chunks - 1:
        return F.pad(hidden, (0, 0, 0, sent_length - length))  # (1, T, H)
    log_probs, entropy = policy.head(hidden[0], part, temperature)
    if context_parallel is not None:
        log_probs, entropy = context_parallel.gather(micro, log_probs, entropy)
    return F.pad(torch.stack([log_probs, entropy]), (0, sent_length - log_probs.shape[0]))


# ---- the schedule ---------------------------------------------------------------------------
class _StageModule(nn.Module):
    """What a `PipelineStage` runs: the policy's chunk `local` on the micro-batch it is
    told, sending tensors of `sent_length`; `chunk_term(micro)`, where given, is a loss
    term of the chunk's own (MoE load balancing), added to the step's loss through what
    the chunk sends (`_AddToLoss`)."""

    def __init__(self, policy, local: int, micro_batches: list[PackedMicroBatch],
                 temperature: float, sent_length: int,
                 chunk_term: Callable[[PackedMicroBatch], torch.Tensor] | None):
        super().__init__()
        self.policy = policy
        self.local = local
        self.micro_batches = micro_batches
        self.temperature = temperature
        self.sent_length = sent_length
        self.chunk_term = chunk_term

    def forward(self, activations: torch.Tensor, micro_index: torch.Tensor) -> torch.Tensor:
        self.policy.pipeline.running = self.local
        micro = self.micro_batches[int(micro_index)]
        output = self.policy(micro, self.temperature, (activations, self.sent_length))
        if micro.routed_experts is not None and torch.is_grad_enabled():
            output = _RouteInBackward.apply(output, self.policy, micro)
        if self.chunk_term is None:
            return output
        return _AddToLoss.apply(output, self.chunk_term(micro))


class _RouteInBackward(torch.autograd.Function):
    """`output` unchanged; its backward sets the routers' replayed routes back to the
    micro-batch's before the chunk's layers recompute (full recomputation): a schedule
    runs other micro-batches' forwards between a micro-batch's forward and backward."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, policy, micro: PackedMicroBatch) -> torch.Tensor:
        ctx.policy, ctx.micro = policy, micro
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.policy.route(ctx.micro)
        return grad, None, None


class _AddToLoss(torch.autograd.Function):
    """`output` unchanged, and `term` added to whatever loss `output` reaches: the
    backward that reaches `output` gives `term` the gradient 1 (Megatron adds its MoE
    auxiliary losses to the activations this way)."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(term)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (term,) = ctx.saved_tensors
        return grad, torch.ones_like(term)


def schedule_class(num_micro_batches: int, num_stages: int, chunks_per_rank: int) -> type:
    """1F1B (one chunk per rank) needs as many micro-batches as stages, else GPipe (the
    same result). Interleaved 1F1B (several chunks) runs max(1, count // stages) rounds
    and needs the count to be a multiple of them, else looped BFS (any count)."""
    if chunks_per_rank == 1:
        return Schedule1F1B if num_micro_batches >= num_stages else ScheduleGPipe
    rounds = max(1, num_micro_batches // num_stages)
    return ScheduleInterleaved1F1B if num_micro_batches % rounds == 0 else ScheduleLoopedBFS


class Pipeline:
    """Runs the micro-batches of a step through the stages of a pipeline group."""

    def __init__(self, policy, pp_group: dist.ProcessGroup, device: torch.device,
                 hidden_dtype: torch.dtype):
        self.policy = policy
        self.role: PipelineRole = policy.pipeline
        self.group = pp_group
        self.device = device
        self.hidden_dtype = hidden_dtype

    def run(self, micro_batches: list[PackedMicroBatch], temperature: float,
            loss_fn: Callable[[PackedMicroBatch, torch.Tensor], torch.Tensor],
            backward: bool,
            chunk_term: Callable[[PackedMicroBatch], torch.Tensor] | None = None) -> None:
        """Forward (and backward) of every micro-batch; `loss_fn(micro, output)` is
        called on the last stage for each, in order, with its (2, N) log-probs and
        entropy at the targets, and returns the micro-batch's loss; `chunk_term(micro)`,
        called after each chunk's forward on every stage, adds a term of its own."""
        role, count = self.role, len(micro_batches)
        lengths = self._lengths(micro_batches)
        stages = []
        for local in range(len(role.chunks)):
            chunk = role.chunk_index(local)
            module = _StageModule(self.policy, local, micro_batches, temperature,
                                  lengths[chunk + 1], chunk_term)
            stages.append(PipelineStage(
                module, chunk, role.num_chunks, self.device, group=self.group,
                input_args=self._meta(chunk, lengths[chunk]),
                output_args=self._meta(chunk + 1, lengths[chunk + 1])))

        def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            micro = micro_batches[int(target)]
            return loss_fn(micro, output[:, :micro.targets.shape[0]])
        schedule = schedule_class(count, role.num_stages, len(role.chunks))(
            stages[0] if len(stages) == 1 else stages, count, loss_fn=loss, scale_grads=False)
        indices = torch.arange(count, device=self.device)
        args = (torch.cat([F.pad(m.input_ids, (0, lengths[0] - m.input_ids.shape[1]))
                           for m in micro_batches]),) if role.is_first else ()
        target = indices if role.is_last else None
        (schedule.step if backward else schedule.eval)(*args, target=target,
                                                       micro_index=indices)

    def _lengths(self, micro_batches: list[PackedMicroBatch]) -> list[int]:
        """The padded length of what enters each chunk, and of the last one's output:
        the longest row's ids, hidden states of the longest row (with context
        parallelism, of the longest part), and the longest row's targets."""
        longest = max(m.input_ids.shape[1] for m in micro_batches)
        context_parallel = self.policy.context_parallel
        hidden = longest if context_parallel is None \
            else max(context_parallel.local_rows(m.num_tokens) for m in micro_batches)
        return [longest] + [hidden] * (self.role.num_chunks - 1) + [longest]

    def _meta(self, stage_index: int, length: int) -> torch.Tensor:
        """The tensor entering chunk `stage_index` (leaving the one before)."""
        if stage_index == 0:
            return torch.empty(1, length, dtype=torch.long, device=self.device)
        if stage_index == self.role.num_chunks:
            return torch.empty(2, length, dtype=torch.float32, device=self.device,
                               requires_grad=True)
        hidden_size = self.policy.hf_model.config.hidden_size  # gradients flow back
        return torch.empty(1, length, hidden_size, dtype=self.hidden_dtype, device=self.device,
                           requires_grad=True)

    def broadcast_from_last(self, values: list) -> list:
        """`values` of the last stage, on every stage of the pipeline."""
        box = [values]
        dist.broadcast_object_list(box, group=self.group, group_src=self.role.num_stages - 1)
        return box[0]


# ---- what the trainer calls ---------------------------------------------------------------
def pipeline_groups(mesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """(this rank's pipeline group, the group of its pipeline's first and last stages,
    which sum the tied embedding's gradient; None on a middle stage). Collective with
    more than two stages (new process groups): build them once."""
    num_stages = mesh["pp"].size()
    group = mesh["pp"].get_group()
    if num_stages == 2:
        return group, group
    ranks = mesh.mesh.reshape(num_stages, -1)  # (pp, dp x cp x tp)
    tied = None
    for column in range(ranks.shape[1]):
        pair = [int(ranks[0, column]), int(ranks[-1, column])]
        pair_group = dist.new_group(pair)
        if dist.get_rank() in pair:
            tied = pair_group
    return group, tied


def log_probs(pipeline: Pipeline, micro_batches: list[PackedMicroBatch],
              temperature: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probs, entropy) at the targets of each micro-batch, on the CPU, on every
    stage of the pipeline (computed by the last)."""
    values = []

    def keep(micro: PackedMicroBatch, output: torch.Tensor) -> torch.Tensor:
        values.append((output[0].cpu(), output[1].cpu()))
        return output.sum() * 0
    pipeline.run(micro_batches, temperature, keep, backward=False)
    return pipeline.broadcast_from_last(values)


def backward(pipeline: Pipeline, micro_batches: list[PackedMicroBatch], temperature: float,
             micro_loss: Callable[[PackedMicroBatch, torch.Tensor, torch.Tensor],
                                  tuple[torch.Tensor, dict]],
             chunk_term: Callable[[PackedMicroBatch], torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
    """Forward and backward of every micro-batch; `micro_loss(micro, log_probs, entropy)`
    returns the loss to differentiate and the micro-batch's metrics, summed here (last
    stage; empty elsewhere); `chunk_term` as in `Pipeline.run`."""
    totals: dict[str, torch.Tensor] = {}

    def loss(micro: PackedMicroBatch, output: torch.Tensor) -> torch.Tensor:
        value, metrics = micro_loss(micro, output[0], output[1])
        for name, metric in metrics.items():
            totals[name] = totals.get(name, 0.0) + metric.detach().float()
        return value
    pipeline.run(micro_batches, temperature, loss, backward=True, chunk_term=chunk_term)
    return totals


def whole_model_routes(pipeline: Pipeline, routes: list[torch.Tensor],
                       columns: list[int], num_layers: int) -> list[torch.Tensor]:
    """Each micro-batch's routes (T, num_layers, k) on every stage, from each stage's
    `routes` of its MoE layers (T, len(columns), k), `columns` naming them."""
    parts: list = [None] * pipeline.role.num_stages
    dist.all_gather_object(parts, (columns, routes), group=pipeline.group)
    whole = []
    for index, micro_routes in enumerate(routes):
        tokens, k = micro_routes.shape[0], micro_routes.shape[2]
        rows = torch.empty(tokens, num_layers, k, dtype=micro_routes.dtype)
        for stage_columns, stage_routes in parts:
            rows[:, stage_columns] = stage_routes[index]
        whole.append(rows)
    return whole


def sum_tied_gradient(weight: nn.Parameter | None, group: dist.ProcessGroup | None) -> None:
    """The tied embedding/output weight's gradient: the embedding's part (first stage)
    plus the head's (last stage), on both."""
    if weight is None or weight.grad is None:
        return
    sum_gradient(weight.grad, group)


def stage_named_weights(hf_model: nn.Module, role: PipelineRole, device: torch.device,
                        include: Callable[[str], bool] = lambda name: True
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stage's (HF name, full tensor) of the parameters whose name `include` accepts,
    stage by stage, one tensor at a time, on every rank: a stage's ranks gather each of
    its parameters over their ranks (dp, cp, tp, ep) and its first rank broadcasts it to
    the world. A tied output weight comes once, from the first stage. Collective: every
    rank iterates to the end. The policy's FSDP modules must be resharded
    (`parallel.reshard`)."""
    stage_world = dist.get_world_size() // role.num_stages
    tied = hf_model.config.tie_word_embeddings
    local = [(name, param) for name, param in hf_model.named_parameters()
             if include(name) and not (tied and name == "lm_head.weight" and not role.is_first)]
    for stage_index in range(role.num_stages):
        mine, source = stage_index == role.stage_index, stage_index * stage_world
        header = [[(role.global_name(name), param.shape, param.dtype)
                   for name, param in local] if mine else None]
        dist.broadcast_object_list(header, src=source)
        for index, (name, shape, dtype) in enumerate(header[0]):
            tensor = full_tensor(local[index][1].detach()) if mine \
                else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, src=source)
            yield name, tensor


def full_state_dict(hf_model: nn.Module, role: PipelineRole, device: torch.device,
                    keep: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on the CPU where `keep` (one rank), None elsewhere."""
    state = {name: tensor.cpu() for name, tensor in stage_named_weights(hf_model, role, device)
             if keep}
    return state if keep else None
