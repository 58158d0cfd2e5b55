"""Learning-rate schedule values (hand-computed) and optimizer parameter groups."""
from __future__ import annotations

import math

import pytest
import torch

from furlong.config.groups import OptimizerArgs
from furlong.train.optim import LRScheduler, build_optimizer, learning_rate


def lr(step, total=100, **values):
    return learning_rate(step, OptimizerArgs(**{"lr": 1e-3, **values}), total)


def test_constant():
    assert [lr(s) for s in (0, 50, 99)] == [1e-3] * 3


def test_linear_warmup_then_constant():
    assert lr(0, lr_warmup_iters=10) == 0.0
    assert lr(5, lr_warmup_iters=10) == pytest.approx(5e-4)
    assert lr(10, lr_warmup_iters=10) == 1e-3


def test_warmup_starts_from_warmup_init():
    assert lr(0, lr_warmup_iters=4, lr_warmup_init=2e-4) == pytest.approx(2e-4)
    assert lr(2, lr_warmup_iters=4, lr_warmup_init=2e-4) == pytest.approx(6e-4)


def test_linear_decay_to_min_lr():
    # warmup 10 of 110 decay steps: at step 60, half way through the decay.
    values = dict(lr_decay_style="linear", min_lr=1e-4, lr_warmup_iters=10)
    assert lr(60, total=110, **values) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr(110, total=110, **values) == pytest.approx(1e-4)
    assert lr(500, total=110, **values) == pytest.approx(1e-4)


def test_cosine_decay():
    values = dict(lr_decay_style="cosine", min_lr=0.0)
    assert lr(25, total=100, **values) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr(100, total=100, **values) == pytest.approx(0.0, abs=1e-12)


def test_warmup_fraction_and_decay_iters():
    values = dict(lr_decay_style="linear", lr_warmup_fraction=0.1, lr_decay_iters=50)
    assert lr(2, total=1000, **values) == pytest.approx(1e-3 * 2 / 5)  # warmup = 0.1 * 50
    assert lr(50, total=1000, **values) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_sets_and_restores_lr():
    model = torch.nn.Linear(2, 2)
    config = OptimizerArgs(lr=1e-3, lr_warmup_iters=4)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = LRScheduler(optimizer, config, total_steps=10)
    scheduler.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    restored = LRScheduler(build_optimizer(model.parameters(), config), config, total_steps=10)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model.parameters(),
                                OptimizerArgs(weight_decay=0.1, adam_beta2=0.98))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert optimizer.defaults["betas"] == (0.9, 0.98)
