"""bfloat16 weights for compute, float32 master weights for the optimizer (one GPU).

The model's parameters are cast to bfloat16 once, so the forward and backward run on
them with no per-step casts of the weights and no wrapper around the layers. Each
trainable parameter keeps a float32 master (its original storage); as soon as autograd
has accumulated a parameter's bfloat16 gradient, a hook adds it to the master's float32
gradient and frees it, so micro-batches accumulate in float32. The optimizer steps the
masters and `copy_to_model` rounds them back into the model. Megatron's optimizer for
half-precision parameters keeps the same split; several ranks get it from FSDP2's mixed
precision instead (train/parallel.py).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class MasterWeights:
    """The float32 masters of `model`'s parameters; casts `model` to `dtype`. Frozen
    parameters keep theirs too (checkpoints and weight pushes carry float32 values) but
    get no gradient hook and stay out of the optimizer."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self._model = model
        self._names: list[str] = []
        self._masters: list[nn.Parameter] = []  # one per parameter, in model order
        self._trained: list[tuple[nn.Parameter, nn.Parameter]] = []  # (param, master)
        with torch.no_grad():
            for name, param in model.named_parameters():
                master = nn.Parameter(param.data.float(), requires_grad=param.requires_grad)
                param.data = param.data.to(dtype)
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(_accumulate_into(master))
                    self._trained.append((param, master))
                self._names.append(name)
                self._masters.append(master)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters' float32 masters, in `model.named_parameters()` order:
        what the optimizer steps."""
        return [master for _, master in self._trained]

    def named_masters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(model's parameter name, float32 master) of every parameter, tied ones once."""
        return zip(self._names, (master.detach() for master in self._masters), strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with each parameter's float32 master in its place (tied
        names share one master, as they shared one parameter)."""
        master_of = {id(param): master.detach() for param, master in
                     zip(self._model.parameters(), self._masters, strict=True)}
        return {name: master_of.get(id(value), value.detach())
                for name, value in self._model.state_dict(keep_vars=True).items()}

    def to(self, device: torch.device) -> None:
        """Move the masters (the same objects, which optimizer state is keyed on)."""
        for master in self._masters:
            master.data = master.data.to(device, non_blocking=True)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the trained masters into the model's parameters (after an optimizer step)."""
        if self._trained:
            torch._foreach_copy_([param for param, _ in self._trained], self.parameters())


def _accumulate_into(master: nn.Parameter):
    def hook(param: torch.Tensor) -> None:
        if master.grad is None:
            master.grad = param.grad.float()
        else:
            master.grad.add_(param.grad)
        param.grad = None
    return hook
