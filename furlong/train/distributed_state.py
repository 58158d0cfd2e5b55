"""State of a parallelised policy seen whole: full weights, gradient norm, optimizer shards.

Parameters of a parallelised policy are DTensors (FSDP shards over "dp", tensor
parallel slices over "tp", experts split over "ep" and FSDP-sharded over "edp");
everything here also accepts plain tensors, so one code
path serves one process and many. Functions that gather are collective: every rank
calls them, in the same order. With --optimizer-cpu-offload the shards of a CUDA mesh
sit in host memory; they travel to the device for a collective (NCCL's tensors are on
the device).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import _StridedShard


def mesh_device(tensor: DTensor) -> torch.device:
    """Where `tensor`'s mesh runs its collectives: the current GPU, or the CPU."""
    if tensor.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(tensor.device_mesh.device_type)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a DTensor), on its mesh's
    device."""
    if not isinstance(tensor, DTensor):
        return tensor
    tensor = tensor.to(mesh_device(tensor))  # no copy unless offloaded to the host
    # Gather one mesh dimension at a time, innermost ("tp") last: DTensor would do the
    # same in one call, with a warning per parameter about FSDP's strided layout.
    placements = list(tensor.placements)
    for dim in range(len(placements)):
        placements[dim] = Replicate()
        tensor = tensor.redistribute(tensor.device_mesh, placements)
    return tensor.to_local()


def full_named_weights(hf_model: nn.Module, include: Callable[[str], bool] = lambda name: True
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter whose name `include` accepts, one at a time so
    that memory stays bounded.

    Collective: every rank iterates to the end (all receive the tensors; weight sync
    sends rank 0's). Tied weights come once, as in `named_parameters`. The policy's
    FSDP modules must be resharded (`parallel.reshard`), which they are after a
    training step and after `TrainActor.compute_log_probs`.
    """
    for name, param in hf_model.named_parameters():
        if include(name):
            yield name, full_tensor(param.detach())


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}" if module_name else name, buffer


def full_state_dict(hf_model: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The model's full state on the CPU where `keep` (one rank), None elsewhere.

    Collective; the device holds one gathered parameter at a time.
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in full_named_weights(hf_model):
        if keep:
            state[name] = tensor.cpu()
    for name, buffer in _persistent_buffers(hf_model):
        if keep:
            state[name] = full_tensor(buffer).cpu()
    return state if keep else None


def sum_gradient(grad: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Sum this rank's part of a gradient over `group`, in place. With
    --optimizer-cpu-offload the shard is in host memory, and NCCL sums device tensors:
    it goes through the device and back."""
    local = grad.to_local() if isinstance(grad, DTensor) else grad
    device = collective_device(group)
    if local.device != device:
        summed = local.to(device)
        dist.all_reduce(summed, group=group)
        local.copy_(summed)
    else:
        dist.all_reduce(local, group=group)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float,
                    num_stages: int = 1, uncounted: nn.Parameter | None = None) -> float:
    """Scale gradients so that their global L2 norm is at most `max_norm`; returns the
    norm before clipping. Sharded gradients count once: a rank's squared local shard is
    divided by the number of ranks holding that same shard, then summed over all ranks
    (one all-reduce, whatever mix of meshes the gradients live on). With pipeline stages
    a parameter lives on the world / `num_stages` ranks of its stage; `uncounted` (the
    last stage's copy of a tied embedding, counted on the first) is scaled, not counted."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if not dist.is_initialized():
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    # Every rank joins the all-reduce, one with no gradient too (a pipeline stage whose
    # layers hold no adapter).
    locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = collective_device()
    norms = torch.stack(torch._foreach_norm(locals_, 2, dtype=torch.float64)) if locals_ \
        else torch.zeros(0, dtype=torch.float64, device=device)  # one launch
    if uncounted is not None and uncounted.grad is not None:
        norms[next(i for i, p in enumerate(parameters) if p is uncounted)] = 0.0
    copies = torch.tensor([_copies(g, num_stages) for g in grads], dtype=torch.float64,
                          device=norms.device)
    squares = (norms.square() / copies).sum().to(device)
    dist.all_reduce(squares)
    norm = math.sqrt(squares.item())
    if max_norm < norm:
        scale = max_norm / (norm + 1e-6)
        torch._foreach_mul_(locals_, scale)
    return norm


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where `group`'s collectives (the default group's) take tensors: the current GPU
    under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _copies(grad: torch.Tensor, num_stages: int = 1) -> int:
    """How many ranks hold the same values as this rank for `grad`."""
    world = (dist.get_world_size() if dist.is_initialized() else 1) // num_stages
    if not isinstance(grad, DTensor):
        return world
    mesh = grad.device_mesh
    shards = 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_partial():
            raise AssertionError("a gradient is still a partial sum: reduce it first")
        # FSDP over "dp" of a tensor already sharded on the same dimension ("tp", "ep")
        # is a _StridedShard, which is not `is_shard()`.
        if placement.is_shard() or isinstance(placement, _StridedShard):
            shards *= mesh.size(dim)
    return world // shards


# ---- optimizer state of an earlier version's checkpoint: each rank's shards --------------
def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load one rank's `optimizer.state_dict()` as earlier versions saved it (DTensor
    values as their local shards), on the layout of ranks and parameters that saved it."""
    optimizer.load_state_dict(state)
    for param, values in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) \
                    and value.shape == param.to_local().shape and value.dim() > 0:
                values[key] = DTensor.from_local(value, param.device_mesh, param.placements,
                                                 run_check=False, shape=param.shape,
                                                 stride=param.stride())
