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
(`expert_parallel.py`) the data-parallel dimension (or, when ep does not divide it, a
stage's whole (dp, cp, tp) grid) is also seen as ("edp", "ep"): the "ep" ranks of a group hold
different experts of each MoE layer, the "edp" ranks the same ones. With pipeline
parallelism (`pipeline_parallel.py`) a "pp" dimension comes first, outermost (Megatron's
order): the ranks of stage s are the s-th block of world / pp consecutive ranks, each
block a ("dp", "cp", "tp") mesh of its own.

`parallelize` supports the decoder layers of Qwen2, Qwen3 and Llama (HF module names
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, the two layer norms and Qwen3's
per-head q_norm/k_norm; `tensor_parallel.py` splits them), and Qwen-family MoE layers,
whose attention tensor parallel splits while each tensor-parallel rank runs the MoE
block whole (or on its sequence slice). One process (`RankInfo()`, or one GPU) is not
parallelised: the plain model is faster and needs no process group.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                    OffloadPolicy, fully_shard)
from torch.utils.checkpoint import checkpoint

from furlong.config.groups import OptimizerArgs, PerfArgs
from furlong.model.attention import RECOMPUTE_CORE
from furlong.ports import free_port
from furlong.train.context_parallel import apply_context_parallel, check_context_parallel_size
from furlong.train.expert_parallel import (NestedRowParts, RowSlices, apply_expert_parallel,
                                           expert_gradient_scale, expert_modules,
                                           groups_beyond_data_parallel, moe_blocks_on_slices)
from furlong.train.pipeline_layout import PipelineLayout, rank_chunks
from furlong.train.pipeline_parallel import PipelineRole, split_stage
from furlong.train.tensor_parallel import apply_tensor_parallel


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
    check_pipeline_ranks(rank.world_size, pp)
    check_tensor_parallel_size(rank.world_size // pp, tp)
    check_context_parallel_size(rank.world_size // pp, tp, cp)
    if (rank.tp_size, rank.cp_size, rank.pp_size) != (tp, cp, pp):
        raise ValueError(f"RankInfo (tp_size {rank.tp_size}, cp_size {rank.cp_size}, pp_size "
                         f"{rank.pp_size}) differs from --tensor-model-parallel-size {tp} / "
                         f"--context-parallel-size {cp} / --pipeline-model-parallel-size {pp}")


def check_pipeline_ranks(world_size: int, pp_size: int) -> None:
    """Pipeline stages tile the ranks: each stage is a block of world / pp ranks."""
    if pp_size < 1 or world_size % pp_size:
        raise ValueError(f"--pipeline-model-parallel-size {pp_size} does not divide the "
                         f"{world_size} trainer ranks: the trainer is pp x dp x cp x tp ranks; "
                         f"give a multiple of {pp_size} ranks (--actor-num-nodes x "
                         "--actor-num-gpus-per-node) or fewer stages")


def rank_info(rank: int, world_size: int, tp_size: int, device_type: str,
              master_addr: str = "127.0.0.1", master_port: int | None = None,
              cp_size: int = 1, pp_size: int = 1) -> RankInfo:
    """The RankInfo of global rank `rank` (GPU: the one `init_distributed` makes current)."""
    check_pipeline_ranks(world_size, pp_size)
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
    check_pipeline_ranks(world_size, pp_size)
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


def sharding_mesh(mesh: DeviceMesh, dim: str = "dp") -> DeviceMesh:
    """The ranks FSDP shards parameters and averages gradients over: `dim` ("dp"; an
    expert mesh's "edp", the ranks holding the same experts), times "cp", whose ranks
    hold the same parameters and see other tokens (flattening again returns the mesh
    flattened before)."""
    if "cp" in mesh.mesh_dim_names and mesh["cp"].size() > 1:
        return mesh[dim, "cp"]._flatten(f"{dim}_cp")
    return mesh[dim]


def build_expert_mesh(mesh: DeviceMesh, ep_size: int) -> DeviceMesh:
    """Expert groups of `ep_size` adjacent data-parallel ranks, the ("dp", "cp", "tp")
    `mesh` seen as ("edp", "ep", "cp", "tp"); or, when ep does not divide dp, of adjacent
    ranks of a stage's whole (dp, cp, tp) grid, a mesh ("edp", "ep") of its own, behind
    "pp" with pipeline stages (expert_parallel.py says when each applies). New process
    groups: build it once."""
    dp_size = mesh["dp"].size()
    if groups_beyond_data_parallel(ep_size, dp_size):
        stages = ("pp",) if "pp" in mesh.mesh_dim_names else ()
        shape = tuple(mesh[dim].size() for dim in stages)
        stage_ranks = mesh.size() // math.prod(shape)
        return init_device_mesh(mesh.device_type, (*shape, stage_ranks // ep_size, ep_size),
                                mesh_dim_names=(*stages, "edp", "ep"))
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
    moe_on_slices = expert_mesh is not None and moe_blocks_on_slices(ep, dp, tp)
    if tp > 1:
        apply_tensor_parallel(hf_model, layers, mesh["tp"], perf.sequence_parallel,
                              moe_on_slices, chunk_entries(policy.pipeline))
    if mesh["cp"].size() > 1:
        apply_context_parallel(policy, mesh["cp"], tp)
    if expert_mesh is not None:
        apply_expert_parallel(layers, expert_mesh["ep"], expert_gradient_scale(ep, dp, tp))
    if moe_on_slices:  # (of the context-parallel part, with context parallelism)
        slices = RowSlices(mesh["tp"])
        policy.row_parts = slices if policy.row_parts is None \
            else NestedRowParts(policy.row_parts, slices)
    apply_activation_checkpointing(layers, perf)
    apply_fully_shard(policy, layers, sharding_mesh(mesh), mixed_precision,
                      sharding_mesh(expert_mesh, "edp") if expert_mesh is not None else None,
                      offload)
    return policy


def apply_pipeline_split(policy: nn.Module, stage_index: int, layout: PipelineLayout) -> None:
    """Keep the layers of pipeline rank `stage_index`'s chunks (and the embeddings on the
    first, the head on the last)."""
    layers = decoder_layers(policy.hf_model)
    chunks = rank_chunks(len(layers), layout, stage_index)
    role = PipelineRole(stage_index, layout.num_stages, chunks)
    split_stage(policy.hf_model, role)
    policy.pipeline = role
    if policy.routing_replay is not None:  # routes still name the whole model's layers
        policy.routing_replay.keep_present(policy.hf_model)


def chunk_entries(role: PipelineRole | None) -> tuple[int, ...]:
    """The local index of the first layer of each model chunk a rank holds (0 alone
    without pipeline stages)."""
    if role is None:
        return (0,)
    return tuple(role.chunk_slice(local).start for local in range(len(role.chunks)))


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    layers = getattr(hf_model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(hf_model).__name__}: the fsdp backend parallelises models "
                         "whose decoder keeps its blocks in `.layers` (Qwen2/Qwen3/Llama)")
    return layers


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
    layer's experts first, over `expert_mesh` ("edp", or "edp_cp" with context
    parallelism: `sharding_mesh`; the ranks holding the same
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
