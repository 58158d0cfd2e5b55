"""Placement of trainer ranks and engines, and the layout errors found before Ray starts.
The runs on Ray with CPU bundles are in test_cluster_sync.py, test_cluster_servers.py and
test_ray_runs*.py."""
from __future__ import annotations

import pytest

from furlong.cluster.placement import plan_placement
from furlong.config import ConfigError, load_config


def config_of(grpo_argv, *extra):
    return load_config(grpo_argv + list(extra))[0]


def test_no_cluster_flags_means_one_process(grpo_argv):
    for gpus in (0, 1, 8):
        placement = plan_placement(config_of(grpo_argv), gpus)
        assert placement.in_process and placement.trainer_ranks == 1
        assert placement.device == ("cuda" if gpus else "cpu")


def test_disaggregated_layout(grpo_argv):
    placement = plan_placement(config_of(
        grpo_argv, "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "4",
        "--rollout-num-gpus-per-engine", "2"), 8)
    assert not placement.in_process and not placement.colocate
    assert placement.trainer_ranks == 4 and placement.num_engines == 2
    assert placement.engine_devices == [[4, 5], [6, 7]]


def test_colocated_layout_shares_trainer_devices(grpo_argv):
    placement = plan_placement(config_of(grpo_argv, "--actor-num-gpus-per-node", "2",
                                         "--colocate"), 2)
    assert placement.colocate and placement.num_engines == 2
    assert placement.engine_devices == [[0], [1]]


def test_one_device_colocated_stays_in_process(grpo_argv):
    placement = plan_placement(config_of(grpo_argv, "--actor-num-gpus-per-node", "1",
                                         "--colocate"), 1)
    assert placement.in_process


def test_cpu_machine_places_cpu_processes(grpo_argv):
    placement = plan_placement(config_of(grpo_argv, "--actor-num-gpus-per-node", "2",
                                         "--rollout-num-gpus", "1"), 0)
    assert placement.device == "cpu" and placement.trainer_ranks == 2
    assert not placement.in_process


@pytest.mark.parametrize("flags,message", [
    (("--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "8"), "needs 12 GPUs"),
    (("--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "3",
      "--rollout-num-gpus-per-engine", "2"), "does not divide"),
    (("--actor-num-gpus-per-node", "2"), "no engine devices"),
    (("--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "4",
      "--rollout-num-gpus-per-engine", "4", "--num-gpus-per-node", "2"),
     "--rollout-num-gpus-per-engine 4 is more than --num-gpus-per-node 2"),
])
def test_impossible_layouts_are_clear_errors(grpo_argv, flags, message):
    """Errors of plan_placement, so --dry-run reports them (--num-gpus-per-node was once
    read by nothing: an engine wider than a node failed when Ray gave up placing it)."""
    with pytest.raises(ConfigError, match=message):
        plan_placement(config_of(grpo_argv, *flags), 8)


@pytest.mark.parametrize("flags,message", [
    (("--rollout-num-gpus", "2", "--rollout-backend", "hf"),
     "--rollout-backend hf: the built-in engine runs on one device"),
])
def test_engine_limits_fail_before_ray_starts(grpo_argv, monkeypatch, flags, message):
    """Regression: these were found only after Ray had started (the built-in engine's
    after the trainer ranks had loaded the model)."""
    pytest.importorskip("ray")
    from furlong.cluster import ray_cluster
    from furlong.engine.factory import engine_options
    monkeypatch.setattr(ray_cluster, "start_ray", lambda placement: pytest.fail("Ray started"))
    config = config_of(grpo_argv, "--actor-num-gpus-per-node", "2",
                       "--rollout-num-gpus-per-engine", "2", *flags)
    placement = plan_placement(config, 0)
    with pytest.raises(ConfigError, match=message):
        ray_cluster.build_ray_roles(config, placement, "", 1,
                                    engine_options(config, placement.colocate), trains=True)


def test_weight_group_counts_every_gpu_of_a_server(grpo_argv, monkeypatch):
    """Regression: trainers on Ray formed the weight-update group with one rank per
    server, so an SGLang server of --rollout-num-gpus-per-engine 2 brought a rank the
    group did not count, and the broadcast never started."""
    pytest.importorskip("ray")
    from furlong.cluster import ray_trainer
    config = config_of(grpo_argv, "--rollout-num-gpus-per-engine", "2")
    servers = ray_trainer.engine_servers(["http://10.0.0.1:1", "http://10.0.0.2:2"],
                                         config.sglang)
    assert servers.world_size == 1 + 2 * 2
