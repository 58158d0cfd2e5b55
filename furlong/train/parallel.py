"""The fsdp backend's parallelism: process group, device mesh, and how a policy is
split over ranks (pipeline stages, tensor/sequence parallel, context parallel, activation
checkpointing, FSDP2).

The mesh has three dimensions, ("dp", "cp", "tp"), tensor-parallel innermost: global
rank r is tensor-parallel rank r % tp, context-parallel rank (r // tp) % cp and
data-parallel rank r // (cp tp). Data-parallel ranks see different samples; the ranks
of one tensor-parallel group see the same samples and each holds a slice of every
linear layer (Megatron's layout, done with DTensor); the ranks of one context-parallel
group see the same samples and each holds 1/cp of every micro-batch's tokens
(`context_parallel.py`). FSDP2 shards parameters over "dp", or over "dp_cp" (the
flattened ("dp", "cp")) with context parallelism. With expert parallelism
(`expert_parallel.py`) the data-parallel dimension is also seen as ("edp", "ep"): the
"ep" ranks of a group hold different experts of each MoE layer, the "edp" ranks the
same ones. With pipeline parallelism (`pipeline_parallel.py`) a "pp" dimension comes
first, outermost (Megatron's order): the ranks of stage s are the s-th block of
world / pp consecutive ranks, each block a ("dp", "cp", "tp") mesh of its own.

`parallelize` supports the decoder layers of Qwen2, Qwen3 and Llama (HF module
names self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, the two layer norms and
Qwen3's per-head q_norm/k_norm), and Qwen-family MoE layers, whose attention tensor
parallel splits while each tensor-parallel rank runs the MoE block whole. One process
(`RankInfo()`, or one GPU) is not parallelised: the plain model is faster and needs no
process group.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                    OffloadPolicy, fully_shard)
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle,
                                               PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)
from torch.utils.checkpoint import checkpoint

from furlong.config.groups import OptimizerArgs, PerfArgs
from furlong.model.attention import RECOMPUTE_CORE
from furlong.ports import free_port
from furlong.train.context_parallel import apply_context_parallel, check_context_parallel_size
from furlong.train.expert_parallel import (RowSlices, apply_expert_parallel,
                                           expert_gradient_scale, expert_modules,
                                           groups_span_tensor_parallel)
from furlong.train.lora_parallel import lora_plan
from furlong.train.pipeline_layout import PipelineLayout, rank_chunks
from furlong.train.pipeline_parallel import PipelineRole, split_stage


# ---- where a rank sits -------------------------------------------------------------------
@dataclass(frozen=True)
class RankInfo:
    """A trainer rank's coordinates in the ("dp", "cp", "tp") mesh, its device and
    rendezvous.

    `RankInfo()` is one CPU process and `RankInfo(device=torch.device("cuda"))` one GPU.
    `master_port` may stay None when the process group exists before the trainer is
    built (Ray ranks), or for a world of one (a free port is picked).
    """
    dp_rank: int = 0
    dp_size: int = 1
    device: torch.device = torch.device("cpu")
    tp_rank: int = 0
    tp_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    backend: str | None = None  # default: nccl on GPU, gloo on CPU
    cp_rank: int = 0
    cp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def rank(self) -> int:
        data = self.pp_rank * self.dp_size + self.dp_rank
        return (data * self.cp_size + self.cp_rank) * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.pp_size * self.dp_size * self.cp_size * self.tp_size

    @property
    def sharded(self) -> bool:
        """Whether the policy goes through `parallelize`: several ranks. One process, CPU
        or GPU, trains the plain model."""
        return self.world_size > 1

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def check_tensor_parallel_size(world_size: int, tp_size: int) -> None:
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(f"--tensor-model-parallel-size {tp_size} does not divide the "
                         f"{world_size} trainer ranks: choose a divisor of the trainer's "
                         "world size (--actor-num-nodes x --actor-num-gpus-per-node)")


def check_rank_layout(rank: RankInfo, perf: PerfArgs) -> None:
    """The flags' tensor- and context-parallel sizes tile `rank`'s world, and `rank` was
    made for them."""
    tp, cp = perf.tensor_model_parallel_size, perf.context_parallel_size
    pp = perf.pipeline_model_parallel_size
    check_pipeline_ranks(rank.world_size, pp, tp * cp * perf.expert_model_parallel_size)
    check_tensor_parallel_size(rank.world_size // pp, tp)
    check_context_parallel_size(rank.world_size // pp, tp, cp)
    if (rank.tp_size, rank.cp_size, rank.pp_size) != (tp, cp, pp):
        raise ValueError(f"RankInfo (tp_size {rank.tp_size}, cp_size {rank.cp_size}, pp_size "
                         f"{rank.pp_size}) differs from --tensor-model-parallel-size {tp} / "
                         f"--context-parallel-size {cp} / --pipeline-model-parallel-size {pp}")


def check_pipeline_ranks(world_size: int, pp_size: int, other_model_parallel: int) -> None:
    """Pipeline stages tile the ranks; this build pipelines over data-parallel ranks only."""
    if pp_size < 1 or world_size % pp_size:
        raise ValueError(f"--pipeline-model-parallel-size {pp_size} does not divide the "
                         f"{world_size} trainer ranks: the trainer is pp x dp ranks; give a "
                         f"multiple of {pp_size} ranks (--actor-num-nodes x "
                         "--actor-num-gpus-per-node) or fewer stages")
    if pp_size > 1 and other_model_parallel > 1:
        raise ValueError(f"--pipeline-model-parallel-size {pp_size} with tensor, context or "
                         "expert parallelism is not supported yet: set "
                         "--tensor-model-parallel-size, --context-parallel-size and "
                         "--expert-model-parallel-size to 1, or the pipeline size to 1")


def rank_info(rank: int, world_size: int, tp_size: int, device_type: str,
              master_addr: str = "127.0.0.1", master_port: int | None = None,
              cp_size: int = 1, pp_size: int = 1) -> RankInfo:
    """The RankInfo of global rank `rank` (GPU: the one `init_distributed` makes current)."""
    check_pipeline_ranks(world_size, pp_size, tp_size * cp_size)
    stage_world = world_size // pp_size
    check_tensor_parallel_size(stage_world, tp_size)
    check_context_parallel_size(stage_world, tp_size, cp_size)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    group = tp_size * cp_size
    return RankInfo(rank % stage_world // group, stage_world // group, device,
                    rank % tp_size, tp_size, master_addr, master_port,
                    cp_rank=rank // tp_size % cp_size, cp_size=cp_size,
                    pp_rank=rank // stage_world, pp_size=pp_size)


# ---- process group and mesh ---------------------------------------------------------
def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     backend: str, local_rank: int | None = None) -> None:
    """Join the default process group (once per process; later calls do nothing).

    "nccl" also makes the local GPU current: `local_rank`, by default rank modulo the
    visible GPUs (Ray gives each actor one visible GPU, so 0 there).
    """
    if dist.is_initialized():
        return
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count() if local_rank is None
                              else local_rank)
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size)


def join(rank: RankInfo) -> None:
    """Join the process group of `rank`'s world, unless this process is in one already
    (then it must be that world)."""
    if dist.is_initialized():
        if dist.get_world_size() != rank.world_size:
            raise ValueError(f"this process is in a process group of "
                             f"{dist.get_world_size()} ranks, not {rank.world_size}")
        return
    if rank.master_port is None and rank.world_size > 1:
        raise ValueError("several trainer ranks need RankInfo.master_port")
    backend = rank.backend or ("nccl" if rank.device.type == "cuda" else "gloo")
    init_distributed(rank.rank, rank.world_size, rank.master_addr,
                     rank.master_port or free_port(), backend, local_rank=rank.device.index)


def build_mesh(world_size: int, tp_size: int, device_type: str, cp_size: int = 1,
               pp_size: int = 1) -> DeviceMesh:
    """A (dp, cp, tp) mesh over all ranks, tensor-parallel ranks adjacent, then
    context-parallel ones, behind a leading "pp" with pipeline stages; with cp > 1 also
    the flattened "dp_cp" that FSDP shards over (new process groups: build it once)."""
    check_pipeline_ranks(world_size, pp_size, tp_size * cp_size)
    stage_world = world_size // pp_size
    check_tensor_parallel_size(stage_world, tp_size)
    check_context_parallel_size(stage_world, tp_size, cp_size)
    shape = (stage_world // (tp_size * cp_size), cp_size, tp_size)
    if pp_size > 1:
        return init_device_mesh(device_type, (pp_size, *shape),
                                mesh_dim_names=("pp", "dp", "cp", "tp"))
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "cp", "tp"))
    if cp_size > 1:
        mesh["dp", "cp"]._flatten("dp_cp")
    return mesh


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks FSDP shards parameters and averages gradients over: "dp", times "cp"
    (the flattened mesh `build_mesh` made, which flattening again returns)."""
    return mesh["dp", "cp"]._flatten("dp_cp") if mesh["cp"].size() > 1 else mesh["dp"]


def build_expert_mesh(mesh: DeviceMesh, ep_size: int) -> DeviceMesh:
    """Expert groups of `ep_size` adjacent data-parallel ranks, the ("dp", "cp", "tp")
    `mesh` seen as ("edp", "ep", "cp", "tp"); or, when ep does not divide dp, of adjacent
    ranks of the whole (dp, tp) grid, a mesh ("edp", "ep") of its own (expert_parallel.py
    says when each applies). New process groups: build it once."""
    dp_size = mesh["dp"].size()
    if groups_span_tensor_parallel(ep_size, dp_size):
        ranks = mesh.size()
        return init_device_mesh(mesh.device_type, (ranks // ep_size, ep_size),
                                mesh_dim_names=("edp", "ep"))
    return mesh._unflatten("dp", (dp_size // ep_size, ep_size), ("edp", "ep"))


# ---- the order ------------------------------------------------------------------------
def parallelize(policy: nn.Module, mesh: DeviceMesh, perf: PerfArgs, mixed_precision: bool,
                expert_mesh: DeviceMesh | None = None,
                offload: OffloadPolicy = OffloadPolicy()) -> nn.Module:
    """Split `policy` (a CausalLMPolicy: `policy.hf_model` is the HF model) over `mesh`,
    and its experts over `expert_mesh` (`build_expert_mesh`) when given; FSDP2 keeps the
    shards where `offload` says (`offload_policy`).

    The order matters. The pipeline split comes first: a stage parallelises only the
    layers it keeps. Tensor parallel comes next because it replaces each linear
    weight by its DTensor slice, which FSDP then shards further over "dp" (FSDP2 of a
    TP DTensor is the 2-D layout); context parallel next, as it splits the heads a
    tensor-parallel rank holds (it changes no parameter); expert parallel likewise
    leaves each rank its experts as DTensors over "ep", which FSDP shards further over
    "edp". Activation checkpointing comes before FSDP so that FSDP's all-gather hooks
    stay outside the recomputed region: the backward recomputes a layer with the
    parameters FSDP has already gathered for it. FSDP goes per decoder layer (one
    all-gather in flight per layer), then the root; the root is the policy rather than
    the HF model because the chunked log-prob head runs in the policy's forward, and a
    root gathers its own parameters (embeddings, final norm, output weight) around its
    forward only.
    """
    hf_model = policy.hf_model
    if "pp" in mesh.mesh_dim_names:
        apply_pipeline_split(policy, mesh["pp"].get_local_rank(), PipelineLayout.from_perf(perf))
    layers = decoder_layers(hf_model)
    ep, dp, tp = perf.expert_model_parallel_size, mesh["dp"].size(), mesh["tp"].size()
    moe_on_slices = expert_mesh is not None and groups_span_tensor_parallel(ep, dp)
    if tp > 1:
        apply_tensor_parallel(hf_model, mesh["tp"], perf.sequence_parallel, moe_on_slices)
    if mesh["cp"].size() > 1:
        apply_context_parallel(policy, mesh["cp"], tp)
    if expert_mesh is not None:
        apply_expert_parallel(layers, expert_mesh["ep"], expert_gradient_scale(ep, dp, tp))
    if moe_on_slices:
        policy.row_slices = RowSlices(mesh["tp"])
    apply_activation_checkpointing(layers, perf)
    apply_fully_shard(policy, layers, sharding_mesh(mesh), mixed_precision,
                      expert_mesh["edp"] if expert_mesh is not None else None, offload)
    return policy


def apply_pipeline_split(policy: nn.Module, stage_index: int, layout: PipelineLayout) -> None:
    """Keep the layers of pipeline rank `stage_index`'s chunks (and the embeddings on the
    first, the head on the last)."""
    layers = decoder_layers(policy.hf_model)
    chunks = rank_chunks(len(layers), layout, stage_index)
    role = PipelineRole(stage_index, layout.num_stages, chunks)
    split_stage(policy.hf_model, role)
    policy.pipeline = role


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    layers = getattr(hf_model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(hf_model).__name__}: the fsdp backend parallelises models "
                         "whose decoder keeps its blocks in `.layers` (Qwen2/Qwen3/Llama)")
    return layers


# ---- tensor and sequence parallel -------------------------------------------------------
def _check_divisible(config, tp_size: int) -> None:
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % tp_size:
            raise ValueError(f"--tensor-model-parallel-size {tp_size} does not divide the "
                             f"model's {name} ({value}): choose a divisor of it")


def _layer_plan(layer: nn.Module, sequence_parallel: bool, moe_on_slices: bool) -> dict:
    """Megatron's split of one block: q/k/v and gate/up by output features (each rank
    gets whole heads), o and down by input features, summed over ranks. With sequence
    parallel the sum is a reduce-scatter over the sequence and the norms run on the
    rank's sequence slice; the attention and MLP inputs are all-gathered first.

    An MoE block (router and experts) is not split: every tensor-parallel rank runs it
    on the whole (replicated) sequence, so its gradients are the same on each (experts
    are split by expert parallelism instead). With sequence parallel its input is
    all-gathered and its output sliced back to the rank's part of the sequence, unless
    `moe_on_slices` (expert groups across tensor-parallel ranks): each rank then runs it
    on its own slice (`SequenceSlice`).

    LoRA: adapted projections are split as train/lora_parallel.py says."""
    block_output = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=block_output,
                                            use_local_output=not sequence_parallel),
    }
    moe_block = hasattr(layer.mlp, "experts")
    if not moe_block:
        plan.update({
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=block_output,
                                             use_local_output=not sequence_parallel),
        })
    if hasattr(layer.self_attn, "q_norm"):
        # Qwen3 normalises each head of (B, T, heads, D): the heads (dim 2) are this
        # rank's, so the norm weight is a replicated DTensor whose gradient is summed
        # over the tensor-parallel ranks.
        for name in ("self_attn.q_norm", "self_attn.k_norm"):
            plan[name] = SequenceParallel(sequence_dim=2, use_local_output=True)
    if sequence_parallel:
        plan.update({
            "input_layernorm": SequenceParallel(),
            "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "mlp": _moe_block_style(moe_on_slices) if moe_block
            else PrepareModuleInput(input_layouts=(Shard(1),),
                                    desired_input_layouts=(Replicate(),)),
        })
    return lora_plan(layer, plan)


def _moe_block_style(on_slices: bool) -> ParallelStyle:
    if on_slices:
        return SequenceSlice()
    return PrepareModuleInputOutput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
        output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
        use_local_output=False)


class SequenceSlice(ParallelStyle):
    """A module run on this rank's slice of a sequence-parallel row: its input, a
    Shard(1) DTensor, reaches it as the local slice, and its output leaves as a Shard(1)
    DTensor of the input's global shape (slices may be uneven)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        layouts = []  # (shape, stride) of each call's input, until its output

        def take_slice(_, args):
            (hidden,) = args
            layouts.append((hidden.shape, hidden.stride()))
            return (hidden.to_local(),)

        def as_shard(_, args, output):
            shape, stride = layouts.pop()
            return DTensor.from_local(output, device_mesh, [Shard(1)], run_check=False,
                                      shape=shape, stride=stride)

        module.register_forward_pre_hook(take_slice)
        module.register_forward_hook(as_shard)
        return module


def apply_tensor_parallel(hf_model: nn.Module, tp_mesh: DeviceMesh,
                          sequence_parallel: bool, moe_on_slices: bool = False) -> None:
    """Slice every decoder layer over `tp_mesh`. The embeddings, the final norm and the
    output weight stay whole (FSDP still shards them over "dp"): the policy's log-prob
    head needs the full vocabulary at every position. With sequence parallel the
    first block's input is split along the sequence and the final norm's input
    gathered back, so the final norm and the head see the whole (replicated) row."""
    _check_divisible(hf_model.config, tp_mesh.size())
    layers = decoder_layers(hf_model)
    device = torch.device(tp_mesh.device_type, torch.cuda.current_device()
                          if tp_mesh.device_type == "cuda" else None)
    for layer in layers:
        layer.to(device)  # one full layer at a time on the device, then sliced
        frozen = {name for name, param in layer.named_parameters() if not param.requires_grad}
        parallelize_module(layer, tp_mesh, _layer_plan(layer, sequence_parallel, moe_on_slices))
        # SequenceParallel's replicated parameters (norms) come back trainable: a frozen
        # one (LoRA's base) stays frozen.
        for name, param in layer.named_parameters():
            param.requires_grad_(name not in frozen)
    if sequence_parallel:
        parallelize_module(layers[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),)))
        parallelize_module(hf_model.base_model.norm, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
            use_local_output=True))


# ---- activation checkpointing -----------------------------------------------------------
def _checkpointed(forward):
    """`forward` under non-reentrant checkpointing when a backward will follow."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def recomputed_layers(num_layers: int, perf: PerfArgs) -> list[int]:
    """Indices of the decoder layers recomputed whole (--recompute-granularity full).

    uniform: every layer, each its own unit (Megatron groups --recompute-num-layers
    layers per unit, which saves one input per group instead of one per layer; here
    each layer is a unit so that FSDP's per-layer hooks stay outside the checkpoint).
    block: the first --recompute-num-layers layers (all of them when unset).
    """
    if perf.recompute_granularity != "full":
        return []
    if perf.recompute_method == "block":
        return list(range(min(perf.recompute_num_layers or num_layers, num_layers)))
    return list(range(num_layers))


def apply_activation_checkpointing(layers: nn.ModuleList, perf: PerfArgs) -> None:
    """--recompute-granularity full: the chosen layers keep only their input and run
    again in the backward. selective: every layer keeps its projections and recomputes
    only the attention core (scores, softmax, weighted sum), Megatron's choice; with
    the flash kernel that core stores little anyway, the saving is on the SDPA path.

    The layer's `forward` is wrapped on the instance, not the module: module hooks
    (tensor parallel's layouts, FSDP's all-gathers) run once, outside the
    recomputation, and the HF parameter names do not change.
    """
    if perf.recompute_granularity == "selective":
        for layer in layers:
            setattr(layer.self_attn, RECOMPUTE_CORE, True)
        return
    for index in recomputed_layers(len(layers), perf):
        layers[index].forward = _checkpointed(layers[index].forward)


# ---- FSDP2 --------------------------------------------------------------------------------
def offload_policy(optimizer: OptimizerArgs | None, device_type: str) -> OffloadPolicy:
    """--optimizer-cpu-offload for the trained policy (`optimizer` its flags; None for a
    reference): FSDP2's CPUOffloadPolicy keeps the float32 shards, their gradients and so
    AdamW's state in host memory, copies each layer's shards to the device for its
    all-gather and each reduced gradient back, and the optimizer steps on the CPU. With
    --overlap-cpu-optimizer-d2h-h2d on CUDA the host memory is pinned and the copies
    non-blocking: gradients travel during the backward, shards with the prefetched
    all-gathers."""
    if optimizer is None or not optimizer.optimizer_cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=optimizer.overlap_cpu_optimizer_d2h_h2d
                            and device_type == "cuda")


def apply_fully_shard(policy: nn.Module, layers: nn.ModuleList, dp_mesh: DeviceMesh,
                      mixed_precision: bool, expert_mesh: DeviceMesh | None = None,
                      offload: OffloadPolicy = OffloadPolicy()) -> None:
    """Shard each decoder layer, then the root, over `dp_mesh` ("dp", or "dp_cp" with
    context parallelism: `sharding_mesh`); with expert parallelism each
    layer's experts first, over `expert_mesh` ("edp": the ranks holding the same
    experts), as a unit of their own inside the layer's. Mixed precision keeps the
    float32 master weights and optimizer state sharded and gathers bfloat16 copies for
    compute, so the whole forward (residual stream included) runs in bfloat16;
    gradients are reduced in float32. With one sharding rank nothing is sharded, so
    a layer keeps its gathered copy from the forward to the backward instead of
    gathering (copying and casting) it twice. `offload` (`offload_policy`) keeps the
    shards in host memory."""
    layer_policy = root_policy = MixedPrecisionPolicy()  # float32 throughout
    if mixed_precision:
        layer_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                            reduce_dtype=torch.float32)
        # The root's input is a PackedMicroBatch: ids, and loss fields it does not read.
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                           reduce_dtype=torch.float32,
                                           cast_forward_inputs=False)
    for layer in layers:
        for experts in expert_modules([layer]) if expert_mesh is not None else ():
            fully_shard(experts, mesh=expert_mesh, mp_policy=layer_policy,
                        reshard_after_forward=expert_mesh.size() > 1, offload_policy=offload)
        fully_shard(layer, mesh=dp_mesh, mp_policy=layer_policy,
                    reshard_after_forward=dp_mesh.size() > 1, offload_policy=offload)
    fully_shard(policy, mesh=dp_mesh, mp_policy=root_policy, offload_policy=offload)


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter under `module` (FSDP keeps the root's gathered
    after a forward, expecting a backward; after a no-grad forward it would stay)."""
    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()
