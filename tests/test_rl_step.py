"""The RL step's contracts: both trainers offer what `Trainer` names, and the flags pick
where old log-probs come from in one place."""
from __future__ import annotations

import inspect

import pytest

from furlong.config.groups import GrpoArgs, RolloutArgs
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.base import Trainer
from furlong.train.rl_step import OldLogProbs, old_log_probs_source

from conftest import policy_config

METHODS = [name for name, member in vars(Trainer).items()
           if inspect.isfunction(member) and not name.startswith("_")]
PROPERTIES = [name for name, member in vars(Trainer).items() if isinstance(member, property)]


def test_train_actor_is_a_trainer(tiny):
    actor = TrainActor(policy_config(tiny, []), RankInfo(), str(tiny / "model"), total_steps=1)
    assert isinstance(actor, Trainer)


def test_ray_train_group_offers_every_trainer_member():
    """Guards against a loop call that only the in-process trainer answers (found only by
    a run on a Ray cluster): every method with the protocol's parameters, every property
    a property or set in __init__."""
    pytest.importorskip("ray")
    from furlong.cluster.ray_trainer import RayTrainGroup
    assert {"compute_log_probs", "train", "push_weights", "save", "restore"} <= set(METHODS)
    for name in METHODS:
        expected = inspect.signature(getattr(Trainer, name)).parameters
        assert list(inspect.signature(getattr(RayTrainGroup, name)).parameters) == \
            list(expected), name
    init = inspect.getsource(RayTrainGroup.__init__)
    for name in PROPERTIES:
        assert isinstance(getattr(RayTrainGroup, name, None), property) or \
            f"self.{name} =" in init, name


@pytest.mark.parametrize("flags,source", [
    ({}, OldLogProbs.TRAINING_FORWARD),
    ({"num_steps_per_rollout": 2}, OldLogProbs.RECOMPUTED),
    ({"kl_coef": 0.1}, OldLogProbs.RECOMPUTED),
    ({"loss_type": "custom_loss"}, OldLogProbs.RECOMPUTED),
    ({"keep_old_actor": True, "num_steps_per_rollout": 2}, OldLogProbs.GENERATING_WEIGHTS),
    ({"use_rollout_logprobs": True, "kl_coef": 0.1}, OldLogProbs.ROLLOUT),
])
def test_old_log_probs_source(flags, source):
    rollout_names = {"num_steps_per_rollout", "keep_old_actor"}
    grpo = GrpoArgs(**{k: v for k, v in flags.items() if k not in rollout_names})
    rollout = RolloutArgs(**{"num_steps_per_rollout": 1,
                             **{k: v for k, v in flags.items() if k in rollout_names}})
    assert old_log_probs_source(grpo, rollout) is source
