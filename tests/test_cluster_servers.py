"""Processes that Ray places on CPU bundles: the trainers' rendezvous on rank 0's node, and
engine server processes started by ServerHost actors."""
from __future__ import annotations

import pytest

from furlong.config import load_config
from ray_weights import (SYNC_FLAGS, assert_engines_follow_the_trainer,
                         assert_engines_hold_the_pushed_weights, read_back_every_push)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_trainers_meet_on_the_node_of_rank_0(grpo_argv, tiny, monkeypatch, ray_cluster):
    """Regression: the trainers' rendezvous address and port came from the driver, whose
    node need not host rank 0 (bundle 0), and a run over several nodes hung. A task on
    rank 0's bundle picks them now, so a port taken where the driver runs does not matter."""
    import socket

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from furlong.cluster import ray_calls, ray_trainer
    config = load_config(grpo_argv + ["--actor-num-gpus-per-node", "2",
                                      "--rollout-num-gpus", "1"])[0]
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        monkeypatch.setattr(ray_calls, "free_port", lambda host=None: taken.getsockname()[1])
        group = placement_group([{"CPU": 1}, {"CPU": 1}])
        try:
            ray.get(group.ready())
            trainer = ray_trainer.RayTrainGroup(config, group, [0, 1], 0, str(tiny / "model"), 1)
            assert trainer.world_size == 2
            trainer.close()
        finally:
            remove_placement_group(group)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_places_server_processes_on_engine_bundles(grpo_argv, tiny, tmp_path, monkeypatch,
                                                       ray_cluster):
    """--rollout-backend sglang under Ray: one server process per engine bundle, started
    by a ServerHost actor with the exact SGLang command (furlong's server stands in for
    SGLang here), fed weights by broadcast, stopped at the end."""
    from dataclasses import replace

    import psutil

    from furlong import cli
    from furlong.cluster import ray_cluster as cluster
    from furlong.engine.launcher import BUILTIN_SERVER
    original = cluster.server_spec
    monkeypatch.setattr(cluster, "resolve_backend", lambda options, device: "sglang")
    monkeypatch.setattr(cluster, "server_spec", lambda path, options, device: original(
        path, replace(options, server_module=BUILTIN_SERVER), device))
    pushes = read_back_every_push(monkeypatch, tmp_path / "pushed")
    argv = grpo_argv + ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "2",
                        *SYNC_FLAGS, "--run-dir", str(tmp_path), "--num-steps-per-rollout", "2"]
    assert cli.main(argv) == 0
    assert_engines_hold_the_pushed_weights(pushes, 2)
    assert_engines_follow_the_trainer(tmp_path)
    model = str(tiny / "model")
    servers = [p for p in psutil.process_iter(["cmdline"])
               if {"furlong.engine.serve", model} <= set(p.info["cmdline"] or [])]
    assert not servers  # every server process of this run stopped with it
