"""Tensor and sequence parallelism of the decoder layers (Megatron's split, done with
DTensor): q/k/v and gate/up split by output features, o and down by input features; with
--sequence-parallel the norms run on each rank's slice of the row. An MoE block runs
whole on every tensor-parallel rank, or, when expert groups take tensor-parallel ranks
(expert_parallel.py), on the rank's sequence slice (`SequenceSlice`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle,
                                               PrepareModuleInput, PrepareModuleInputOutput,
                                               RowwiseParallel, SequenceParallel,
                                               parallelize_module)

from furlong.model.moe import is_moe_block
from furlong.train.lora_parallel import has_adapters, lora_plan


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
    # LoRA's unsplit matrices take whole rows as plain tensors (lora_parallel.py); a
    # replicated DTensor keeps the backward to one reduce-scatter per block otherwise,
    # where plain inputs all-reduce each projection's input gradient.
    adapted = has_adapters(layer)
    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=block_output,
                                            use_local_output=not sequence_parallel),
    }
    moe_block = is_moe_block(layer.mlp)
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
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
                use_local_output=adapted),
            "mlp": _moe_block_style(moe_on_slices) if moe_block
            else PrepareModuleInput(input_layouts=(Shard(1),),
                                    desired_input_layouts=(Replicate(),),
                                    use_local_output=adapted),
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


def apply_tensor_parallel(hf_model: nn.Module, layers: nn.ModuleList, tp_mesh: DeviceMesh,
                          sequence_parallel: bool, moe_on_slices: bool = False,
                          entry_layers: tuple[int, ...] = (0,)) -> None:
    """Slice every decoder layer over `tp_mesh`. The embeddings, the final norm and the
    output weight stay whole (FSDP still shards them over "dp"): the policy's log-prob
    head needs the full vocabulary at every position. With sequence parallel the input
    of each layer in `entry_layers` (the first; with pipeline stages the first of each
    model chunk, which receives whole rows) is split along the sequence and the final
    norm's input gathered back, so the final norm and the head see the whole
    (replicated) row (a pipeline stage without the final norm sends whole rows:
    `pipeline_parallel.stage_forward`)."""
    _check_divisible(hf_model.config, tp_mesh.size())
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
        for index in entry_layers:
            parallelize_module(layers[index], tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),)))
        if not isinstance(hf_model.base_model.norm, nn.Identity):  # (a middle stage's)
            parallelize_module(hf_model.base_model.norm, tp_mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                use_local_output=True))
