"""AdamW's state in a checkpoint by HF parameter name, as whole tensors: any layout of
trainer ranks restores what any other saved.

    iter_X/optimizer/part{k}.pt   {"state": {HF name: {"step", "exp_avg", "exp_avg_sq"}},
                                   "scheduler": the LR schedule's state}

Saving: each parameter's state tensors are gathered whole, one at a time, over the ranks
that share the parameter (data-parallel shards, tensor- and expert-parallel splits; as the
model export gathers weights), and the first rank of each pipeline stage writes the part
of the model its stage holds (part k = stage k; one part without pipeline stages).
Restoring: every rank reads the parts (memory-mapped, weights only) and cuts from each
whole tensor the shard its own parameter holds (`distribute_tensor` on the parameter's
mesh and placements, from local data). A dp4 save restores under dp2 x cp2, pp2 x dp2 or
one process, and the other way round, to the bit: Adam's moments are values per weight,
whatever the ranks, and wherever they live (--optimizer-cpu-offload keeps them in host
memory: a save with it resumes without it, and the other way round).

A tied embedding/output weight is stored once, under the embedding's name (the name the
HF checkpoint gives it); a pipeline's last stage, which holds it as the output weight,
reads it from there.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from furlong import checkpoint
from furlong.train.distributed_state import full_tensor

NamedParameters = list[tuple[str, torch.nn.Parameter]]  # (HF name, optimized parameter)


def save(directory: Path, named: NamedParameters, optimizer: torch.optim.Optimizer,
         scheduler: dict, part: int, writer: bool) -> None:
    """Write part `part` of the state of `optimizer`, whose parameters `named` names; the
    `writer` rank writes it. Collective over the ranks that share any of the parameters."""
    state = {}
    for name, param in named:
        values = optimizer.state.get(param)
        if not values:  # never stepped
            continue
        whole = {key: full_tensor(value.detach()) if isinstance(value, torch.Tensor) else value
                 for key, value in sorted(values.items())}
        if writer:
            state[name] = {key: value.cpu() if isinstance(value, torch.Tensor) else value
                           for key, value in whole.items()}
    if writer:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "scheduler": scheduler}, directory / f"part{part}.pt")


def restore(directory: Path, named: NamedParameters,
            optimizer: torch.optim.Optimizer) -> dict:
    """Set `optimizer`'s state from the parts under `directory` for the parameters `named`
    names; returns the LR schedule's state. A parameter with no saved state is an error
    naming it (another model, or other trainable parameters), unless nothing was saved
    (a save before the first step)."""
    parts = sorted(directory.glob("part*.pt"))
    if not parts:
        raise ValueError(f"{directory}: no optimizer parts (part*.pt); the checkpoint is "
                         "incomplete: resume from an earlier iteration")
    saved, scheduler = {}, {}
    for path in parts:
        content = checkpoint.load_state(path, mmap=True)
        saved.update(content["state"])
        scheduler = content["scheduler"]
    group_of = {id(param): group for group in optimizer.param_groups
                for param in group["params"]}
    for name, param in named:
        if name not in saved:
            if saved:
                raise ValueError(f"{directory} holds no optimizer state for {name}: it was "
                                 "saved by another model or with other trainable parameters; "
                                 "start from its model/ directory with --ref-load instead")
            continue
        for key, value in saved[name].items():
            if key != "step" and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise ValueError(f"{directory}: the saved {key} of {name} is "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}: "
                                 "the checkpoint is of another model; start from its model/ "
                                 "directory with --ref-load instead")
        optimizer.state[param] = {key: _placed(value, param, key, group_of[id(param)])
                                  for key, value in saved[name].items()}
    return scheduler


def _placed(value, param: torch.nn.Parameter, key: str, group: dict):
    """A saved whole state value laid out as `param`: its shard, a fresh tensor on its
    device (not a view into the memory-mapped file)."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":  # where torch's AdamW keeps it: on the device when fused
        on_device = group.get("fused") or group.get("capturable")
        return value.to(param.device if on_device else "cpu", copy=True)
    if not isinstance(param, DTensor):
        return value.to(param.device, copy=True)
    shard = distribute_tensor(value, param.device_mesh, param.placements,
                              src_data_rank=None).to_local()
    return DTensor.from_local(shard.to(param.device, copy=True), param.device_mesh,
                              param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())
