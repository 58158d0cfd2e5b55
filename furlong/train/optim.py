"""AdamW and the learning-rate schedule of OPTIMIZER_ARGS (Megatron semantics).

lr(step), for step = optimizer steps taken so far:
  warmup (step < W):        lr_warmup_init + (lr - lr_warmup_init) * step / W
  after warmup, r = (step - W) / (D - W) clipped to [0, 1], D = decay steps:
    constant: lr
    linear:   min_lr + (lr - min_lr) * (1 - r)
    cosine:   min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * r))
W = --lr-warmup-iters, or --lr-warmup-fraction * D; D = --lr-decay-iters or the run's
total optimizer steps.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from furlong.config.groups import OptimizerArgs


def learning_rate(step: int, config: OptimizerArgs, total_steps: int) -> float:
    decay_steps = config.lr_decay_iters or total_steps
    warmup = config.lr_warmup_iters
    if config.lr_warmup_fraction is not None:
        warmup = int(config.lr_warmup_fraction * decay_steps)
    if step < warmup:
        return config.lr_warmup_init + (config.lr - config.lr_warmup_init) * step / warmup
    if config.lr_decay_style == "constant":
        return config.lr
    ratio = min(max((step - warmup) / max(decay_steps - warmup, 1), 0.0), 1.0)
    if config.lr_decay_style == "linear":
        return config.min_lr + (config.lr - config.min_lr) * (1 - ratio)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


def build_optimizer(parameters: Iterable[torch.nn.Parameter],
                    config: OptimizerArgs) -> torch.optim.AdamW:
    """AdamW over the trainable `parameters`; like Megatron, biases and norm weights (1-D
    parameters) get no weight decay. On a GPU the fused kernel updates every parameter
    in one launch per group; with --optimizer-cpu-offload (`parameters` in host memory)
    torch's fused CPU kernel does, in one pass over each tensor."""
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    devices = {param.device.type for group in groups for param in group["params"]}
    fused = devices == {"cuda"} or (config.optimizer_cpu_offload and devices == {"cpu"})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.adam_eps, foreach=None if fused else True,
                             fused=fused or None)


class LRScheduler:
    """Sets each step's learning rate on the optimizer; checkpoints its step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerArgs, total_steps: int):
        self.optimizer = optimizer
        self.config = config
        self.total_steps = total_steps
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        return learning_rate(self.step_count, self.config, self.total_steps)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = state["step_count"]
        self._apply()
