"""bfloat16 weights for compute, float32 master weights for the optimizer (one GPU).

The model's parameters are cast to bfloat16 once, so the forward and backward run on
them with no per-step casts of the weights and no wrapper around the layers. Each
trainable parameter keeps a float32 master (its original storage). As soon as autograd
has accumulated a parameter's bfloat16 gradient, a hook takes it from the parameter:
the first micro-batch's is kept as it is, later ones are added in float32, so
micro-batches accumulate in float32 (one Triton pass each on a GPU,
train/grad_accumulation.py) and a single one costs no conversion. `step` clips
the gradients, steps AdamW on the masters and rounds them back into the model: one
Triton pass per parameter on a GPU (train/fused_adamw.py), torch's ops elsewhere.
With --optimizer-cpu-offload the masters live in host memory and `HostStep`
(train/cpu_optimizer.py) steps them there. Megatron's optimizer for
half-precision parameters keeps the same split; several ranks get it from FSDP2's mixed
precision instead (train/parallel.py).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from furlong.train import fused_adamw
from furlong.train.cpu_optimizer import HostStep
from furlong.train.grad_accumulation import accumulate
from furlong.triton_support import kernels_run


class MasterWeights:
    """The float32 masters of `model`'s parameters; casts `model` to `dtype`. Frozen
    parameters keep theirs too (checkpoints and weight pushes carry float32 values) but
    get no gradient hook and stay out of the optimizer; with `frozen_masters` False
    (LoRA: the frozen base never changes) they keep none and stand for themselves. With
    `host_step` every master is a float32 copy in host memory, which `host_step` steps."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                 host_step: HostStep | None = None, frozen_masters: bool = True):
        self._model = model
        self._host_step = host_step
        self._names: list[str] = []
        self._masters: list[nn.Parameter] = []  # one per parameter, in model order
        self._copies: list[nn.Parameter] = []  # the float32 ones among them
        self._trained: list[tuple[nn.Parameter, nn.Parameter]] = []  # (param, master)
        self._grads: list[torch.Tensor | None] = []  # per trained pair, as accumulated
        with torch.no_grad():
            for name, param in model.named_parameters():
                copied = param.requires_grad or frozen_masters
                master = param  # a frozen one without a master stands for itself
                if copied:
                    on_host = param.data.to("cpu") if host_step is not None else param.data
                    master = nn.Parameter(on_host.float(), requires_grad=param.requires_grad)
                param.data = param.data.to(dtype)
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(self._hook(len(self._trained)))
                    self._grads.append(None)
                    self._trained.append((param, master))
                self._names.append(name)
                self._masters.append(master)
                if copied:
                    self._copies.append(master)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters' float32 masters, in `model.named_parameters()` order:
        what the optimizer steps."""
        return [master for _, master in self._trained]

    def named_masters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(model's parameter name, float32 master) of every parameter, tied ones once (a
        frozen one without a master: the parameter itself)."""
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
        for master in self._copies:
            master.data = master.data.to(device, non_blocking=True)

    def gradients(self) -> list[torch.Tensor | None]:
        """Each trained master's gradient since the last step, in `parameters()` order:
        bfloat16 after one micro-batch, float32 after several, None without any."""
        return list(self._grads)

    def take_gradients(self) -> list[torch.Tensor | None]:
        """`gradients()`, handed over: the next backward starts from none."""
        grads, self._grads = self._grads, [None] * len(self._grads)
        return grads

    def _hook(self, index: int):
        def take(param: torch.Tensor) -> None:
            grad = self._grads[index]
            if grad is None:  # autograd's own tensor, kept: safe while no CUDA graph
                self._grads[index] = param.grad  # replays the backward into it
            else:
                self._grads[index] = accumulate(grad, param.grad)
            param.grad = None
        return take

    @torch.no_grad()
    def step(self, optimizer: torch.optim.AdamW, max_norm: float) -> float:
        """Scale the gradients so that their global L2 norm is at most `max_norm` (as
        `torch.nn.utils.clip_grad_norm_`), step `optimizer` (built on `parameters()`),
        round the masters into the model and drop the gradients; returns the norm
        before clipping."""
        pairs = [(param, master, grad) for (param, master), grad
                 in zip(self._trained, self.take_gradients(), strict=True) if grad is not None]
        if not pairs:
            return 0.0
        params, masters, grads = (list(column) for column in zip(*pairs))
        norm = torch.linalg.vector_norm(torch.stack(
            torch._foreach_norm(grads, 2, dtype=torch.float32)))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if self._host_step is not None:
            self._host_step.step(optimizer, masters, grads, params, scale)
        elif kernels_run(masters[0]):
            fused_adamw.adamw_step(optimizer, masters, grads, params, scale)
        else:
            for master, grad in zip(masters, grads, strict=True):
                master.grad = grad.float() * scale
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.copy_to_model()
        return float(norm)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the trained masters into the model's parameters (after an optimizer step)."""
        if self._trained:
            torch._foreach_copy_([param for param, _ in self._trained], self.parameters())
