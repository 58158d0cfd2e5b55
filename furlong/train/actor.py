"""TrainActor: the policy being trained, its reference, optimizer and schedule.

One instance per trainer rank. Every rank receives the whole rollout batch and takes
its data-parallel share of each optimizer step (`microbatch.split_across_ranks`), so
the split is a pure function of the batch and needs no communication; the ranks of
one tensor-parallel (or context-parallel, or pipeline) group take the same share.
Gradients are averaged over data-parallel (and context-parallel) ranks by FSDP and
metrics summed over data-parallel ranks here.

Where it runs (`RankInfo`):
- one CPU process (`RankInfo()`): the plain HF model in float32, no torch.distributed;
- several CPU processes (gloo): `parallel.parallelize` in float32;
- one GPU: the plain HF model in bfloat16 with compiled decoder layers, its float32
  master weights and optimizer state beside it (`master_weights.MasterWeights`); no
  wrapper, no process group;
- several GPUs (nccl): `parallel.parallelize` with FSDP2 mixed precision, bfloat16
  compute on float32 master weights and optimizer state.
With --optimizer-cpu-offload the float32 masters (FSDP2's shards with several ranks) and
AdamW's state live in host memory and the optimizer steps on the CPU
(train/cpu_optimizer.py on one GPU, FSDP2's CPUOffloadPolicy with several ranks).
With several ranks, --expert-model-parallel-size splits the experts of an MoE model over
groups of data-parallel ranks (train/expert_parallel.py), and --context-parallel-size
each micro-batch's tokens over the ranks of a context-parallel group, which take the same
share, like tensor-parallel ones (train/context_parallel.py), and
--pipeline-model-parallel-size the layers over stages whose ranks take the same share and
run its micro-batches through one schedule (train/pipeline_parallel.py).

With --lora-rank the base (--hf-checkpoint) is frozen and only a LoRA adapter trains
(train/lora_adapter.py): the optimizer holds the adapter alone (one GPU: float32 masters
for it only, the base stays bfloat16), the reference is the policy with its adapter
disabled (no second model), and pushes send the adapter alone (`load_lora_adapter`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from furlong.config.groups import Config
from furlong.model import lora
from furlong.model.fused_kernels import apply_fused_kernels, compile_decoder_layers
from furlong.model.loading import checkpoint_named_tensors, load_hf_model
from furlong.model.moe import RouterRecorder, freeze_routers
from furlong.train import (actor_checkpoint, distributed_state, microbatch, parallel,
                           pipeline_parallel)
from furlong.train.cpu_optimizer import HostStep
from furlong.train.batch import PackedMicroBatch, TrainBatch, pack, split_routes, split_tokens
from furlong.train.expert_parallel import (check_expert_layout, moe_blocks_on_slices,
                                           sum_moe_block_gradients, whole_row_routes)
from furlong.train.load_balancing import load_balancing_term
from furlong.train.lora_adapter import adapter_source, attach_adapter
from furlong.train.master_weights import MasterWeights
from furlong.train.objective import LossInputs, make_reducer, policy_objective, sft_objective
from furlong.train.optim import LRScheduler, build_optimizer
from furlong.train.parallel import RankInfo
from furlong.train.policy import CausalLMPolicy
from furlong.train.weight_snapshots import WeightSnapshots


class TrainActor:
    config: Config
    rank: RankInfo
    mesh: DeviceMesh | None  # ("dp", "cp", "tp"); None for one process
    expert_mesh: DeviceMesh | None  # --expert-model-parallel-size: ("edp", "ep", "cp", "tp"),
    # or ("edp", "ep") when the groups take tensor- or context-parallel ranks
    # (expert_parallel.py); behind "pp" with pipeline stages
    pipeline_groups: tuple  # --pipeline-model-parallel-size: (pipeline, tied-embedding) groups
    policy: CausalLMPolicy
    masters: MasterWeights | None  # one GPU: the policy is bfloat16, these its float32 masters
    routing: RouterRecorder | None  # MoE: the routes of each training forward
    recorded_routes: list[torch.Tensor] | None  # --use-routing-replay: the old forward's
    ref_policy: CausalLMPolicy | None  # None under LoRA: the reference is the base
    snapshots: WeightSnapshots  # --keep-old-actor: host copies by weights version
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    loss_hook: Callable | None  # --custom-loss-function-path
    hook_args: object           # what hooks receive as `args`

    def __init__(self, config: Config, rank: RankInfo, init_weights: str, total_steps: int,
                 loss_hook: Callable | None = None, hook_args=None):
        self.config = config
        self.rank = rank
        self.mesh, self.expert_mesh = self._build_meshes()
        self.policy = self._build_policy(init_weights, trainable=True)
        self.masters = MasterWeights(self.policy.hf_model, host_step=self._host_step(),
                                     frozen_masters=self.lora is None) \
            if self._one_gpu else None
        self.routing = RouterRecorder(self.policy.hf_model) \
            if self.policy.routing_replay is not None else None  # an MoE model
        self.recorded_routes = None
        self.ref_policy = None
        self.snapshots = WeightSnapshots(self._changing_parameters)
        if config.grpo.needs_reference and self.lora is None:
            self.ref_policy = self._build_policy(
                config.ckpt.ref_load or config.ckpt.hf_checkpoint, trainable=False)
        self.teacher = self._build_policy(config.grpo.opd_teacher_load, trainable=False) \
            if config.grpo.needs_teacher else None  # --opd-type megatron (config checks it)
        self.optimizer = build_optimizer(self._optimized_parameters(), config.optimizer)
        self.scheduler = LRScheduler(self.optimizer, config.optimizer, total_steps)
        self.loss_hook = loss_hook
        self.hook_args = hook_args

    def _build_meshes(self) -> tuple[DeviceMesh | None, DeviceMesh | None]:
        """(mesh, expert mesh): both None for one process, no expert mesh without
        --expert-model-parallel-size."""
        rank, perf = self.rank, self.config.perf
        parallel.check_rank_layout(rank, perf)
        if self._ep_size > 1:
            check_expert_layout(self._ep_size, rank.dp_size, rank.tp_size,
                                perf.sequence_parallel, rank.cp_size)
        if not rank.sharded:
            return None, None
        parallel.join(rank)
        mesh = parallel.build_mesh(rank.world_size, rank.tp_size, rank.device.type,
                                   rank.cp_size, rank.pp_size)
        if rank.pp_size > 1:  # (pipeline group, tied-embedding group)
            self.pipeline_groups = pipeline_parallel.pipeline_groups(mesh)
        return mesh, parallel.build_expert_mesh(mesh, self._ep_size) if self._ep_size > 1 else None

    @property
    def _ep_size(self) -> int:
        return self.config.perf.expert_model_parallel_size

    @property
    def _one_gpu(self) -> bool:
        return self.mesh is None and self.rank.device.type == "cuda"

    def _host_step(self) -> HostStep | None:
        """--optimizer-cpu-offload on one GPU: the step of masters in host memory."""
        optimizer = self.config.optimizer
        return HostStep(optimizer.overlap_cpu_optimizer_d2h_h2d) \
            if optimizer.optimizer_cpu_offload else None

    @property
    def lora(self) -> lora.LoraSpec | None:
        """The adapter trained on the frozen base (--lora-rank), or None."""
        return self.policy.lora

    def _build_policy(self, path: str, trainable: bool) -> CausalLMPolicy:
        """The policy in float32 (one GPU: `MasterWeights` then casts the trained one),
        or, for the reference on one GPU, directly in bfloat16. With --lora-rank the
        trained policy is the base (bfloat16 on GPUs: it is never stepped) with the
        adapter from `path` (train/lora_adapter.py) in float32."""
        perf = self.config.perf
        if not trainable:  # no backward, nothing to recompute
            perf = replace(perf, recompute_granularity=None, recompute_method=None)
        device = self.rank.device if self.mesh is None else "cpu"  # parallelize places it
        adapter = trainable and self.config.lora.enabled
        source = adapter_source(path, self.config.lora) if adapter else None
        if adapter:
            path = self.config.ckpt.hf_checkpoint
        half = adapter and self.rank.device.type == "cuda" or self._one_gpu and not trainable
        dtype = torch.bfloat16 if half else torch.float32
        hf_model = load_hf_model(path, dtype, device, packed=True)
        if self.mesh is not None and self.rank.device.type == "cuda" \
                and self.rank.tp_size == 1:
            apply_fused_kernels(hf_model)  # Liger's kernels take no DTensors (TP)
        spec = attach_adapter(hf_model, self.config.lora, self.config.optimizer.seed,
                              source) if adapter else None
        policy = CausalLMPolicy(hf_model, perf.log_probs_chunk_size, spec)
        if not trainable:
            policy.requires_grad_(False).eval()
        elif self.config.model.moe_router_freeze_gate:
            freeze_routers(hf_model)
        if self.mesh is None:
            if perf.recompute_granularity is not None:
                parallel.apply_activation_checkpointing(parallel.decoder_layers(hf_model),
                                                        perf)
            grpo = self.config.grpo  # replay hooks change routes between traced forwards:
            replays = grpo.use_routing_replay or grpo.use_rollout_routing_replay  # eager
            if self._one_gpu and not replays:  # after checkpointing: the graph contains it
                compile_decoder_layers(parallel.decoder_layers(hf_model))
            return policy
        offload = parallel.offload_policy(self.config.optimizer if trainable else None,
                                          self.rank.device.type)
        return parallel.parallelize(policy, self.mesh, perf, self.rank.device.type == "cuda",
                                    self.expert_mesh, offload)

    # ---- splitting -------------------------------------------------------------------
    def _micro_batches(self, batch: TrainBatch, indices: list[int]) -> list[list[int]]:
        """This rank's micro-batches of the samples `indices` (one optimizer step).

        Every data-parallel rank gets the same number of micro-batches and none is
        empty (shares are equal, and a forced count never exceeds a share's sample
        count), so FSDP's collectives line up.
        """
        lengths = {i: len(batch.tokens[i]) for i in indices}
        shares = microbatch.split_across_ranks(indices, lengths, self.rank.dp_size,
                                               self.config.rollout.balance_data)
        mine = shares[self.rank.dp_rank]
        perf = self.config.perf
        if not perf.use_dynamic_batch_size:
            return microbatch.fixed_micro_batches(mine, self.config.rollout.micro_batch_size)
        budget = perf.max_tokens_per_gpu * self.rank.cp_size  # per rank, as in Miles
        count = max(microbatch.min_micro_batches([lengths[i] for i in share], budget)
                    for share in shares)
        return microbatch.token_budget_micro_batches(mine, lengths, budget, count)

    def _forward(self, policy: CausalLMPolicy, micro) -> tuple[torch.Tensor, torch.Tensor]:
        return policy(micro, self.config.rollout.rollout_temperature)

    def _dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    # ---- log-probs ---------------------------------------------------------------------
    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, reference: bool = False,
                          weights_version: int | None = None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-sample (log-probs, entropy) of the response tokens, for every sample.

        Each data-parallel rank computes its share; the shares are gathered so every
        rank holds all. `weights_version` computes them with the weights the engines were
        given at that version (--keep-old-actor snapshots), not the current ones. Under
        LoRA the reference is the policy with its adapter disabled: the base.
        """
        if weights_version is not None:
            if weights_version not in self.snapshots.versions:
                raise RuntimeError(
                    f"--keep-old-actor: no snapshot of weights version {weights_version} "
                    f"(kept: {self.snapshots.versions}); samples older than the last two "
                    "pushes cannot get the log-probs of the weights that generated them")
            with self.snapshots.applied(weights_version):
                return self.compute_log_probs(batch)
        if reference and self.lora is not None:
            with lora.adapters_disabled(self.policy.hf_model):
                return self._policy_log_probs(self.policy, batch, record=False)
        return self._policy_log_probs(self.ref_policy if reference else self.policy, batch,
                                      self.config.grpo.records_routes and not reference)

    @torch.no_grad()
    def compute_teacher_log_probs(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Per-sample log-probs of the response tokens under the teacher (--use-opd
        --opd-type megatron), gathered as `compute_log_probs`'s."""
        return self._policy_log_probs(self.teacher, batch, record=False)[0]

    def _policy_log_probs(self, policy: CausalLMPolicy, batch: TrainBatch, record: bool
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`compute_log_probs` of `policy`; `record` keeps its routes (routing replay)."""
        policy.eval()
        log_probs: list = [None] * len(batch)
        entropy: list = [None] * len(batch)
        routes: list = [None] * len(batch)
        for indices, micro, (values, ent), micro_routes in self._log_prob_passes(
                policy, batch, record, self._micro_batches(batch, list(range(len(batch))))):
            for i, lp, en in zip(indices, split_tokens(values.cpu(), micro),
                                 split_tokens(ent.cpu(), micro), strict=True):
                log_probs[i], entropy[i] = lp, en
            if record:
                for i, r in zip(indices, split_routes(micro_routes, micro), strict=True):
                    routes[i] = r
        parallel.reshard(policy)  # FSDP keeps the root gathered after a forward
        if record:  # the optimizer steps of this rollout replay them (train)
            self.recorded_routes = self._gather(routes)
        return self._gather(log_probs), self._gather(entropy)

    def _log_prob_passes(self, policy: CausalLMPolicy, batch: TrainBatch, record: bool,
                         index_lists: list[list[int]]):
        """(indices, micro-batch, (log-probs, entropy), routes if `record` else None) of
        each non-empty micro-batch; through the pipeline (all at once, on every stage)
        with pipeline stages, whose routes are gathered from every stage."""
        micros = [(i, pack(batch, i, self.rank.device)) for i in index_lists if i]
        if self.rank.pp_size > 1:
            pipeline, packed = self._pipeline(policy), [m for _, m in micros]
            if record:
                policy.routing_replay.record()
            outputs = pipeline_parallel.log_probs(pipeline, packed,
                                                  self.config.rollout.rollout_temperature)
            routes = [None] * len(micros)
            if record:
                replay = policy.routing_replay
                routes = pipeline_parallel.whole_model_routes(
                    pipeline, policy.take_recorded_routes(packed), replay.columns,
                    replay.num_layers)
            yield from ((i, m, out, r) for (i, m), out, r
                        in zip(micros, outputs, routes, strict=True))
            return
        for indices, micro in micros:
            if record:
                policy.routing_replay.record()
            outputs = self._forward(policy, micro)
            yield indices, micro, outputs, \
                policy.take_recorded_routes([micro])[0] if record else None

    def _pipeline(self, policy: CausalLMPolicy) -> pipeline_parallel.Pipeline:
        return pipeline_parallel.Pipeline(policy, self.pipeline_groups[0], self.rank.device,
                                          self.rank.compute_dtype)

    def _gather(self, per_sample: list) -> list[torch.Tensor]:
        if self.rank.dp_size == 1:
            return per_sample
        gathered: list = [None] * self.rank.dp_size
        dist.all_gather_object(gathered, per_sample, group=self._dp_group())
        return [next(part[i] for part in gathered if part[i] is not None)
                for i in range(len(per_sample))]

    # ---- training ----------------------------------------------------------------------
    def train(self, batch: TrainBatch) -> list[dict]:
        """--num-steps-per-rollout optimizer steps over consecutive, near-equal parts of
        the batch: --global-batch-size samples each, unless a custom generate function
        returned more or fewer samples than the flags imply. Parts are whole multiples of
        the data-parallel size (the last takes the rest); a batch too small for every
        step gives fewer steps."""
        if self.recorded_routes is not None:  # --use-routing-replay
            batch = replace(batch, routed_experts=self.recorded_routes)
            self.recorded_routes = None
        if self.config.grpo.reset_optimizer_states:
            self._reset_optimizer_state()
        steps, ranks = self.config.rollout.num_steps_per_rollout, self.rank.dp_size
        units = len(batch) // ranks
        bounds = [round(step * units / steps) * ranks for step in range(steps)] + [len(batch)]
        return [self._train_step(batch, list(range(start, end)))
                for start, end in zip(bounds[:-1], bounds[1:], strict=True) if end > start]

    def _train_step(self, batch: TrainBatch, indices: list[int]) -> dict:
        self.policy.train()
        per_token = self.config.grpo.calculate_per_token_loss
        step_batch = batch.select(indices)
        denominator = step_batch.num_loss_tokens() if per_token else len(indices)
        micros = [pack(batch, i, self.rank.device)
                  for i in self._micro_batches(batch, indices) if i]

        def reducer(micro: PackedMicroBatch) -> Callable[[torch.Tensor], torch.Tensor]:
            return make_reducer(micro, per_token, max(denominator, 1))
        if self.rank.pp_size > 1:
            totals = self._pipelined_backward(micros, reducer)
        else:
            totals = {}
            for micro in micros:
                for name, value in self._backward(micro, reducer(micro)).items():
                    totals[name] = totals.get(name, 0.0) + value.float()
        if moe_blocks_on_slices(self._ep_size, self.rank.dp_size, self.rank.tp_size):
            sum_moe_block_gradients(parallel.decoder_layers(self.policy.hf_model),
                                    self.mesh["tp"].get_group())
        grad_norm = self._optimizer_step()
        names = sorted(totals)
        summed = torch.stack([totals[n] for n in names]).to(self.rank.device) if names \
            else torch.zeros(0, device=self.rank.device)
        if self.rank.dp_size > 1:
            dist.all_reduce(summed, group=self._dp_group())
        result = {f"train/{n}": v for n, v in zip(names, summed.tolist(), strict=True)}
        result.update({"train/grad_norm": grad_norm, "train/lr": self.scheduler.lr})
        if self.rank.pp_size > 1:  # the last stage computed the losses
            result = self._pipeline(self.policy).broadcast_from_last(result)
        self.scheduler.step()
        return result

    def _pipelined_backward(self, micros: list[PackedMicroBatch], reducer: Callable
                            ) -> dict[str, torch.Tensor]:
        """Forward and backward of the step's micro-batches through the pipeline. An MoE
        model's chunks each add their layers' load-balancing term as they run; the
        logged moe_aux_loss is the sum of the stages' shares."""
        pipeline, chunk_term = self._pipeline(self.policy), None
        logged = [torch.zeros((), device=self.rank.device)]
        if self.routing is not None:
            def chunk_term(micro: PackedMicroBatch) -> torch.Tensor:
                role = self.policy.pipeline
                layers = parallel.decoder_layers(self.policy.hf_model)[
                    role.chunk_slice(role.running)]
                term, share = self._balancing_term(self.routing.take(layers), micro,
                                                   reducer(micro))
                logged.append(share)
                return term * self.rank.dp_size * self.rank.cp_size  # as _loss scales
        totals = pipeline_parallel.backward(
            pipeline, micros, self.config.rollout.rollout_temperature,
            lambda micro, lp, ent: self._loss(LossInputs(lp, ent, micro, reducer(micro))),
            chunk_term)
        if self.routing is not None:
            self.routing.take()  # routes recomputed in the backward hold their graph
            summed = torch.stack(logged).sum()
            dist.all_reduce(summed, group=pipeline.group)
            totals["moe_aux_loss"] = summed
        return totals

    def _balancing_term(self, routes: list, micro: PackedMicroBatch,
                        reduce: Callable[[torch.Tensor], torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss term, logged share) of MoE load balancing over `routes`, recorded in a
        forward of `micro` (each rank's part of the row, when it routes a part)."""
        if self.policy.row_parts is not None:  # each rank routed its part of the row
            routes = whole_row_routes(routes, self.policy.row_parts, micro.num_tokens)
        share = reduce(torch.ones(micro.targets.shape[0], device=self.rank.device))
        return load_balancing_term(routes, self.config.model, micro, share,
                                   self.policy.routing_replay.num_layers)

    def _backward(self, micro: PackedMicroBatch,
                  reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of one micro-batch; its metrics (shares of the step)."""
        log_probs, entropy = self._forward(self.policy, micro)
        loss, metrics = self._loss(LossInputs(log_probs, entropy, micro, reduce))
        loss.backward()
        if self.routing is not None:
            self.routing.take()  # routes recomputed in the backward hold their graph
        return metrics

    def _loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        """The loss to differentiate for one micro-batch, and its metrics."""
        loss, metrics = self._objective(inputs)
        if self.routing is not None and self.rank.pp_size == 1:  # (stages add their own)
            term, metrics["moe_aux_loss"] = self._balancing_term(
                self.routing.take(), inputs.micro, inputs.reduce)
            loss = loss + term
        # FSDP averages gradients over data- and context-parallel ranks; the losses are
        # shares of the global mean, and each context-parallel rank's backward holds its
        # own tokens' part, so scaling by dp x cp turns that average back into a sum.
        # Tensor-parallel ranks compute the same loss and need no scaling.
        return loss * self.rank.dp_size * self.rank.cp_size, metrics

    def _objective(self, inputs: LossInputs) -> tuple[torch.Tensor, dict]:
        grpo = self.config.grpo
        if grpo.loss_type == "sft_loss":
            return sft_objective(grpo, inputs)
        if grpo.loss_type == "custom_loss":
            return self.loss_hook(self.hook_args, inputs)
        return policy_objective(grpo, inputs, self.hook_args)

    def _reset_optimizer_state(self) -> None:
        """--reset-optimizer-states: AdamW's moments and step counts back to zero, where
        they are (device, host or shards), as Miles resets them before each rollout's
        training; the learning-rate schedule goes on."""
        with torch.no_grad():
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()

    def _optimized_parameters(self) -> list[torch.nn.Parameter]:
        if self.masters is not None:
            return self.masters.parameters()
        return list(self.policy.parameters())  # build_optimizer leaves out the frozen

    def _optimizer_step(self) -> float:
        clip = self.config.optimizer.clip_grad
        max_norm = clip if clip > 0 else float("inf")
        if self.masters is not None:
            return self.masters.step(self.optimizer, max_norm)
        tied = None
        if self.rank.pp_size > 1:
            tied = pipeline_parallel.tied_weight(self.policy.hf_model, self.policy.pipeline)
            pipeline_parallel.sum_tied_gradient(tied, self.pipeline_groups[1])
        grad_norm = distributed_state.clip_grad_norm_(
            self._optimized_parameters(), max_norm, self.rank.pp_size,
            uncounted=tied if self.policy.pipeline and self.policy.pipeline.is_last else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ---- weights and state -------------------------------------------------------------
    @property
    def has_reference(self) -> bool:
        return self.ref_policy is not None or \
            self.lora is not None and self.config.grpo.needs_reference

    @property
    def model_config(self):
        return self.policy.hf_model.config

    def frozen_base(self) -> dict[str, torch.Tensor] | None:
        """Under LoRA on one rank, the base (HF name -> the parameter or buffer itself),
        which never changes: an engine in this process computes with it rather than with a
        copy. None otherwise."""
        if self.lora is None or self.mesh is not None:
            return None
        return lora.base_tensors(self.policy.hf_model)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full float32 tensors of the current policy, one at a time, under the names of
        its checkpoint files (what SGLang loads; fused MoE experts come one by one).

        With several ranks this is collective: every rank iterates to the end. Under LoRA
        the engines get `named_adapter_weights` instead (the base never changes).
        """
        assert self.lora is None, "a LoRA policy sends named_adapter_weights"
        return checkpoint_named_tensors(self.policy.hf_model, self._full_parameters())

    def named_adapter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full float32 tensors of the LoRA adapter, one at a time, under PEFT's names
        (`model.layers.0.self_attn.q_proj.lora_A.weight`). Collective with several
        ranks."""
        return lora.adapter_tensors(self._full_parameters(lora.is_adapter_name))

    def _full_parameters(self, include: Callable[[str], bool] = lambda name: True
                         ) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full float32 tensor) of each parameter whose name `include` accepts:
        one GPU's masters (on the device even while offloaded, one at a time), or the
        parameters gathered whole, stage by stage with pipeline stages."""
        if self.masters is not None:
            return ((name, master.to(self.rank.device))
                    for name, master in self.masters.named_masters() if include(name))
        parallel.reshard(self.policy)
        hf_model = self.policy.hf_model
        if self.rank.pp_size == 1:
            return distributed_state.full_named_weights(hf_model, include)
        return pipeline_parallel.stage_named_weights(hf_model, self.policy.pipeline,
                                                     self.rank.device, include)

    async def push_weights(self, engine, version: int) -> None:
        """Send the current weights to the engine (in one process: a copy with a dtype
        cast); under LoRA the adapter alone, as `lora.ADAPTER_NAME` (the engine keeps the
        base it booted from, --hf-checkpoint)."""
        if self.lora is not None:
            await engine.load_lora_adapter(lora.ADAPTER_NAME, self.lora.sglang_config(),
                                           list(self.named_adapter_weights()), version)
            return
        await engine.update_weights(self.named_weights(), version)

    def offload(self) -> None:
        """--offload-train: move the optimizer state (two float32 copies of the weights,
        three with one GPU's float32 masters) to the CPU while the engines generate on
        this device; `reload` brings it back. With --optimizer-cpu-offload it stays there."""
        self._move_optimizer_state(torch.device("cpu"))
        if self.rank.device.type == "cuda":
            torch.cuda.empty_cache()

    def reload(self) -> None:
        self._move_optimizer_state(self.rank.device)

    def _move_optimizer_state(self, device: torch.device) -> None:
        if self.config.optimizer.optimizer_cpu_offload:
            return  # in host memory throughout
        if self.masters is not None:
            self.masters.to(device)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim():  # `step` stays put
                    state[key] = value.to(device, non_blocking=True)

    def snapshot_weights(self, version: int) -> None:
        """Keep a host copy of this rank's changing weights as pushed at `version`
        (--keep-old-actor)."""
        self.snapshots.keep(version)

    def _changing_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimizer step may change: all of them, or under LoRA the
        adapter's (the base is frozen)."""
        return [param for name, param in self.policy.named_parameters()
                if self.lora is None or lora.is_adapter_name(name)]

    def update_reference(self) -> None:
        """Copy the policy into the reference (--ref-update-interval); same sharding."""
        parallel.reshard(self.policy)
        parallel.reshard(self.ref_policy)
        with torch.no_grad():
            for target, source in zip(self.ref_policy.parameters(), self.policy.parameters(),
                                      strict=True):
                target.copy_(source)

    def save(self, directory: Path, save_optimizer: bool) -> None:
        """This rank's part of a checkpoint (train/actor_checkpoint.py). Collective."""
        actor_checkpoint.save(self, directory, save_optimizer)

    def restore(self, directory: Path) -> None:
        """Optimizer, schedule and RNG of a checkpoint saved under any layout of ranks (the
        weights were loaded at construction)."""
        actor_checkpoint.restore(self, directory)

    def export_hf(self, path: str | Path) -> None:
        """An HF directory of the current weights (float32). Collective with several
        ranks: all gather, rank 0 writes."""
        actor_checkpoint.export_hf(self, path)
