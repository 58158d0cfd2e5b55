"""The router behind a Ray run learns what the trainer ranks do to its engines, on CPU.

Under Ray the trainer ranks push weights to the engine servers themselves, not through
`EngineRouter.update_weights`, and the loop sees the router through `RayEngineGroup`.
No Ray cluster here: the ranks are stand-ins that record what they were asked to send.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from furlong.engine.router import EngineRouter, EngineState, RouterOptions

pytest.importorskip("ray")

URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2"]  # never reached


def idle_router() -> EngineRouter:
    return EngineRouter(URLS, RouterOptions(health_check_interval_s=None))


class RecordingRank:
    """A trainer rank's `send_weights.remote`, recording (mode, urls, version)."""

    def __init__(self, sent: list):
        self.send_weights = SimpleNamespace(
            remote=lambda mode, servers, version: sent.append((mode, servers.urls, version)))


def test_a_push_by_the_trainer_ranks_reaches_the_routers_bookkeeping(monkeypatch):
    """Regression: RayTrainGroup.push_weights sent to the servers directly, so the router
    never learned of the push: its weight_version stayed None, and an engine awaiting
    weights never served again."""
    from furlong.cluster import ray_trainer
    monkeypatch.setattr(ray_trainer, "wait_all", lambda calls, role: calls)
    router = idle_router()
    router.engines[1].state = EngineState.AWAITING_WEIGHTS
    sent: list = []
    trainer = object.__new__(ray_trainer.RayTrainGroup)  # its ranks only, no cluster
    trainer.config = SimpleNamespace(sglang=SimpleNamespace(rollout_num_gpus_per_engine=1),
                                     lora=SimpleNamespace(lora_rank=0))
    trainer.ranks = [RecordingRank(sent)]
    trainer.urls, trainer.engine_devices, trainer.engine_actors = URLS, [[0], [1]], []
    trainer.sync_mode, trainer.api_key = "value", None

    asyncio.run(trainer.push_weights(router, 7))

    assert sent == [("value", tuple(URLS), 7)]
    assert router.weight_version == 7
    assert router.recovery.weights_pushed
    assert [slot.state for slot in router.engines] == [EngineState.SERVING] * 2


def test_the_loops_weight_source_reaches_the_router_behind_a_ray_engine_group():
    """Regression: loop.offer_weight_source set `weight_source` on the RayEngineGroup
    itself (its __getattr__ made hasattr true), where the router never looked."""
    from furlong.cluster.ray_engine import RayEngineGroup
    from furlong.loop import offer_weight_source
    router = idle_router()
    group = RayEngineGroup(router, actors=[])

    async def source():
        pass

    offer_weight_source(group, source)
    assert router.weight_source is source
    assert group.weight_source is source
