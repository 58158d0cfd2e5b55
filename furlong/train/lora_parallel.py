"""Tensor parallelism of LoRA layers: the plan of a decoder layer (tensor_parallel.py's
`_layer_plan`) rewritten for PEFT's wrapped projections.

A targeted projection is a PEFT layer around the original `nn.Linear` (`base_layer`),
with `lora_A` (in -> r) and `lora_B` (r -> out) beside it: y = W x + s B A x. The base
layer takes the projection's own style; of the adapter only the matrix that touches
the split dimension is split, the rank-r one stays whole (and identical on every
tensor-parallel rank: `lora.attach` seeds A):

    column-parallel (q, k, v, gate, up; output features split):
        base Colwise, lora_B Colwise (B's output rows split), lora_A whole. The input
        x is whole on every rank, so A x is too; the backward of lora_B's input
        redistribution sums the partial gradients of A x over the ranks, so A's
        gradient is whole as well.
    row-parallel (o, down; input features split, outputs summed):
        base Rowwise, lora_A Rowwise (A's input columns split, A x summed over the
        ranks), lora_B whole on the summed A x.

With sequence parallelism a row-parallel output is reduce-scattered over the sequence
(a Shard(1) DTensor), so the adapter branch is too: lora_A's partial sums are
reduce-scattered likewise, and lora_B, whole, runs on the rank's sequence slice (its
weight a replicated DTensor, as a sequence-parallel norm's, whose gradient sums the
slices'). Column-parallel layers see whole rows as plain tensors (the attention and
MLP inputs are gathered and localised first, for the unsplit A), as without sequence
parallelism.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from furlong.model.lora import PEFT_ADAPTER


def has_adapters(layer: nn.Module) -> bool:
    """Whether a decoder layer holds PEFT-wrapped projections."""
    return any(hasattr(module, "base_layer") for module in layer.modules())


def lora_plan(layer: nn.Module, plan: dict) -> dict:
    """`plan` (module path -> parallel style) with each adapted projection's entry moved to
    its `base_layer` and the split adapter matrix added; other entries unchanged."""
    rewritten = {}
    for path, style in plan.items():
        module = layer.get_submodule(path)
        if not hasattr(module, "base_layer"):
            rewritten[path] = style
            continue
        rewritten[f"{path}.base_layer"] = style
        if isinstance(style, ColwiseParallel):
            rewritten[f"{path}.lora_B.{PEFT_ADAPTER}"] = ColwiseParallel()
        elif isinstance(style, RowwiseParallel):
            rewritten[f"{path}.lora_A.{PEFT_ADAPTER}"] = RowwiseParallel(
                output_layouts=style.output_layouts[0], use_local_output=style.use_local_output)
            if style.output_layouts[0] == Shard(1):  # sequence parallel
                rewritten[f"{path}.lora_B.{PEFT_ADAPTER}"] = SequenceParallel()
        else:
            raise AssertionError(f"{path}: no LoRA split for {type(style).__name__}")
    return rewritten
