"""The trained model: an HF causal LM plus per-token log-probs and entropy.

`CausalLMPolicy.forward` takes a packed row of several samples and returns, for each
position whose next token is a response token, log p(next token) under logits / T and
the entropy of that distribution. Only those positions go through the output
projection, in the fused head of model/log_prob_head.py, so the float32 logits of a
whole micro-batch never exist at once (vocabularies of 150k tokens make them the
largest tensor of the step). Keeping the projection inside this module's forward also
means a sharded root (FSDP2) gathers the embedding/output weights around it.

MoE models: a micro-batch that carries `routed_experts` is routed by them (routing replay,
model/moe.py), one that carries none by the routers themselves. `routing_replay.record()`
before a forward keeps its routes for `take_recorded_routes` (--use-routing-replay). When
a rank's routers see part of the row (`row_parts`, an `expert_parallel.RowParts`: expert
groups across tensor-parallel ranks, or context parallelism) they replay their rows of
the given routes, and recorded ones come back whole.

Context parallelism (`context_parallel`, set by train/context_parallel.py): the decoder and
the head run on this rank's part of the row, and the values come back gathered whole.
Pipeline parallelism (`pipeline`, set by train/pipeline_parallel.py): the forward runs
one stage, on the activations the stage before sent.

LoRA (`lora`): PEFT's layers sit inside `hf_model` (model/lora.py); the forward is the
same, and `lora.adapters_disabled(hf_model)` makes it the base model's.
"""
from __future__ import annotations

import torch
from torch import nn

from furlong.model.log_prob_head import log_probs_and_entropy
from furlong.model.lora import LoraSpec
from furlong.model.logits import compute_dtype
from furlong.model.moe import RoutingReplay, is_moe
from furlong.train.batch import PackedMicroBatch
from furlong.train.context_parallel import ContextParallel
from furlong.train.expert_parallel import RowParts
from furlong.train.pipeline_parallel import PipelineRole, stage_forward


class CausalLMPolicy(nn.Module):
    """Wraps an HF `*ForCausalLM`; `hf_model` keeps HF parameter names for weight sync."""

    def __init__(self, hf_model: nn.Module, chunk_size: int = 1024,
                 lora: LoraSpec | None = None):
        super().__init__()
        self.hf_model = hf_model
        self.lora = lora  # the LoRA adapter on `hf_model` (model/lora.py), if any
        self.chunk_size = chunk_size
        self.routing_replay = RoutingReplay(hf_model) if is_moe(hf_model) else None
        self.context_parallel: ContextParallel | None = None
        self.pipeline: PipelineRole | None = None
        self.row_parts: RowParts | None = None

    def take_recorded_routes(self, micros: list[PackedMicroBatch]) -> list[torch.Tensor]:
        """The experts of every token of each of `micros` that its forward recorded (the
        forwards since `routing_replay.record()`, one per micro-batch, in order): (T,
        MoE layers of this rank, k) int32 on the CPU each; the layers are
        `routing_replay.columns` of the whole model (all of them without pipeline
        stages)."""
        parts = self.row_parts

        def whole_rows(local: torch.Tensor) -> torch.Tensor:
            counts = [parts.local_rows(micro.num_tokens) for micro in micros]
            return torch.cat([parts.whole(rows, micro.num_tokens) for rows, micro
                              in zip(local.split(counts), micros, strict=True)])
        routes = self.routing_replay.take_recorded(None if parts is None else whole_rows)
        return list(routes.split([micro.num_tokens for micro in micros]))

    def forward(self, micro: PackedMicroBatch, temperature: float = 1.0,
                stage_input: tuple[torch.Tensor, int] | None = None):
        """Log-probs and entropy at the micro-batch's target positions, (N,) each, float32
        (a pipeline stage, given (activations, length to send): what
        `pipeline_parallel.stage_forward` returns)."""
        self.route(micro)
        if self.pipeline is not None:
            return stage_forward(self, micro, temperature, *stage_input)
        part = micro if self.context_parallel is None else self.context_parallel.shard(micro)
        decoder = self.hf_model.base_model
        hidden = decoder(input_ids=part.input_ids, position_ids=part.position_ids,
                         use_cache=False, cu_seq_lens_q=part.cu_seq_lens,
                         cu_seq_lens_k=part.cu_seq_lens, max_length_q=part.max_length,
                         max_length_k=part.max_length).last_hidden_state[0]  # (T, H)
        log_probs, entropy = self.head(hidden, part, temperature)
        if self.context_parallel is None:
            return log_probs, entropy
        return self.context_parallel.gather(micro, log_probs, entropy)

    def route(self, micro: PackedMicroBatch) -> None:
        """An MoE model's routers replay the micro-batch's routes where it has some (until
        the next call: recomputation in a backward routes as the forward did)."""
        if self.routing_replay is not None:
            routes = micro.routed_experts
            if routes is not None and self.row_parts is not None:
                routes = self.row_parts.local(routes)
            self.routing_replay.replay(routes)
        elif micro.routed_experts is not None:
            raise ValueError("routing replay: the model has no MoE routers")

    def head(self, hidden: torch.Tensor, micro: PackedMicroBatch,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused head on the final hidden states (T, H) at the target positions."""
        hidden = hidden[micro.target_positions]  # (N, H)
        weight = self.hf_model.get_output_embeddings().weight
        weight = weight.to(compute_dtype(hidden))  # once, not per chunk
        return log_probs_and_entropy(hidden, weight, micro.targets, temperature,
                                     self.chunk_size)
