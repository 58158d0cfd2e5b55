"""AdamW over float32 masters and the bfloat16 model in one pass per parameter (Triton).

One GPU's optimizer step (train/master_weights.py) done with torch's ops walks every
parameter five times: the bfloat16 gradient converted to float32, its norm, the clipping
product, torch's fused AdamW, and the master rounded back into the model, about 52 bytes
of memory traffic per parameter. `adamw_step` reads the gradient as it was accumulated
(bfloat16 after one micro-batch, float32 after several), scales it by the clipping
factor, updates the master and both moments exactly as `torch.optim.AdamW` does, and
writes the rounded master into the model: 30 bytes per parameter, plus the norm's read.

The state lives in the `torch.optim.AdamW` instance (its `state[master]` entries and
param groups, as its own fused path initialises them), so checkpoints, the learning-rate
schedule and --offload-train treat it as any AdamW. Runs on CUDA tensors, and on the CPU
under the Triton interpreter (TRITON_INTERPRET=1, the tests).
"""
from __future__ import annotations

import torch

from furlong.triton_support import tl, triton

BLOCK = 4096


if triton is not None:
    @triton.jit
    def _adamw_kernel(master, grad, exp_avg, exp_avg_sq, model, step, scale, numel,
                      lr, beta1, beta2, eps, weight_decay, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        g = tl.load(grad + offsets, mask=inside).to(tl.float32) * tl.load(scale)
        p = tl.load(master + offsets, mask=inside)
        m = tl.load(exp_avg + offsets, mask=inside)
        v = tl.load(exp_avg_sq + offsets, mask=inside)
        t = tl.load(step)
        p = p * (1.0 - lr * weight_decay)
        m = m + (1.0 - beta1) * (g - m)  # torch's lerp
        v = beta2 * v + (1.0 - beta2) * g * g
        correction1 = 1.0 - tl.exp(t * tl.log(beta1))
        correction2 = 1.0 - tl.exp(t * tl.log(beta2))
        denominator = tl.sqrt(v) / tl.sqrt(correction2) + eps
        p = p - (lr / correction1) * m / denominator
        tl.store(master + offsets, p, mask=inside)
        tl.store(exp_avg + offsets, m, mask=inside)
        tl.store(exp_avg_sq + offsets, v, mask=inside)
        tl.store(model + offsets, p.to(model.dtype.element_ty), mask=inside)


def _state(optimizer: torch.optim.AdamW, master: torch.Tensor) -> dict:
    """`optimizer`'s state of `master`, created as its fused path creates it."""
    state = optimizer.state[master]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
        state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def adamw_step(optimizer: torch.optim.AdamW, masters: list[torch.Tensor],
               grads: list[torch.Tensor], models: list[torch.Tensor],
               scale: torch.Tensor) -> None:
    """One AdamW step of `optimizer` on `masters` with gradients `grads * scale` (scale a
    0-d float32 tensor on the device: no host sync), then each master rounded into the
    matching `models` tensor. Every tensor contiguous; masters must be the optimizer's."""
    group_of = {id(param): group for group in optimizer.param_groups
                for param in group["params"]}
    if any(group["amsgrad"] or group["maximize"] for group in optimizer.param_groups):
        raise ValueError("the fused master-weight AdamW has no amsgrad or maximize")
    states = [_state(optimizer, master) for master in masters]
    torch._foreach_add_([state["step"] for state in states], 1.0)
    for master, grad, model, state in zip(masters, grads, models, states, strict=True):
        group = group_of[id(master)]
        beta1, beta2 = group["betas"]
        numel = master.numel()
        _adamw_kernel[(triton.cdiv(numel, BLOCK),)](
            master, grad, state["exp_avg"], state["exp_avg_sq"], model, state["step"], scale,
            numel, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]),
            BLOCK=BLOCK)
