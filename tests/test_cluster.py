"""Placement of trainer ranks and engines; multi-process runs on Ray with CPU bundles."""
from __future__ import annotations

from pathlib import Path

import pytest

from furlong.cluster.placement import plan_placement
from furlong.config import ConfigError, load_config
from furlong.engine.api_key import auth_headers
from furlong.engine.weights.receive import read_hf_weights

# With --lr 1e-3 engines that miss the weight pushes are off the trainer's log-probs by
# 3e-6 to 4.4e-6 (measured); engines that get them agree to 1.7e-7. The random reward
# varies within groups, so advantages are not zero and the weights move by the gradient
# (with the math reward the tiny model scores 0 everywhere); without weight decay,
# nothing else moves them.
SYNC_FLAGS = ["--lr", "1e-3", "--rm-type", "random", "--weight-decay", "0"]
SYNC_BOUND = 1e-6


def config_of(grpo_argv, *extra):
    return load_config(grpo_argv + list(extra))[0]


def assert_engines_follow_the_trainer(run_dir: Path) -> None:
    """Every step's rollout log-probs are the trainer's own, to SYNC_BOUND."""
    from furlong.output.metrics import read_metrics
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) >= 2
    assert max(r["train/train_rollout_logprob_abs_diff"] for r in rows) < SYNC_BOUND


def read_back_every_push(monkeypatch, directory: Path) -> list[dict]:
    """After each weight push of a Ray trainer, the trainer's weights (exported) and what
    every engine it pushed to serves (/get_weights_by_name, whole tensors), appended to
    the returned list as {"version", "trainer", "engines": {url: weights}}."""
    import asyncio

    from furlong.cluster.ray_trainer import RayTrainGroup
    original = RayTrainGroup.push_weights
    pushes: list[dict] = []

    def read_back(trainer: RayTrainGroup, urls: list[str], headers: dict, version: int) -> None:
        path = directory / f"pushed_{len(pushes)}"
        trainer.export_hf(path)
        weights = dict(read_hf_weights(path))
        pushes.append({"version": version, "trainer": weights,
                       "engines": {url: {name: served(url, headers, name, len(tensor))
                                         for name, tensor in weights.items()}
                                   for url in urls}})

    async def push_then_read_back(self, engine, version):
        await original(self, engine, version)
        urls = [url for url in self.urls if url in set(engine.urls)]
        await asyncio.to_thread(read_back, self, urls, auth_headers(engine.options.api_key),
                                version)

    monkeypatch.setattr(RayTrainGroup, "push_weights", push_then_read_back)
    return pushes


def served(url: str, headers: dict, name: str, rows: int):
    """Parameter `name` of the engine server at `url`, whole (its first `rows` rows)."""
    import requests
    import torch
    response = requests.post(f"{url}/get_weights_by_name", timeout=120, headers=headers,
                             json={"name": name, "truncate_size": rows})
    response.raise_for_status()
    return torch.tensor(response.json())


def assert_engines_hold_the_pushed_weights(pushes: list[dict], num_engines: int) -> None:
    """Each push left every engine with the trainer's weights, exactly; the weights after
    the first push are not the boot ones (so the pushes carried the training's updates)."""
    import torch
    assert len(pushes) >= 2
    for push in pushes:
        assert len(push["engines"]) == num_engines
        for url, weights in push["engines"].items():
            for name, tensor in push["trainer"].items():
                torch.testing.assert_close(weights[name], tensor.float(), rtol=0, atol=0,
                                           msg=lambda m: f"{url} {name}: {m}")
    boot, last = pushes[0]["trainer"], pushes[-1]["trainer"]
    assert any(not torch.equal(boot[name], last[name]) for name in boot), \
        "training did not change the weights: the pushes were not tested"


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


# ---- Ray on CPU -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
@pytest.mark.parametrize("layout, num_engines", [(("--rollout-num-gpus", "1"), 1),
                                                 (("--colocate",), 2)],
                         ids=["disaggregated", "colocated"])
def test_ray_run_syncs_weights(grpo_argv, tmp_path, monkeypatch, layout, num_engines):
    """Two CPU trainer ranks (FSDP2 over gloo) and one engine apart (weights by
    broadcast) or two engines on the trainers' bundles (weights by value, requests
    through the router): after each push every engine holds the trainer's weights, and
    its log-probs equal the trainer's."""
    pytest.importorskip("ray")
    from furlong import cli
    pushes = read_back_every_push(monkeypatch, tmp_path / "pushed")
    argv = grpo_argv + ["--actor-num-gpus-per-node", "2", *layout, *SYNC_FLAGS,
                        "--run-dir", str(tmp_path), "--num-steps-per-rollout", "2",
                        "--update-weight-buffer-size", "100000"]
    assert cli.main(argv) == 0
    assert_engines_hold_the_pushed_weights(pushes, num_engines)
    assert_engines_follow_the_trainer(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_trainers_meet_on_the_node_of_rank_0(grpo_argv, tiny, monkeypatch):
    """Regression: the trainers' rendezvous address and port came from the driver, whose
    node need not host rank 0 (bundle 0), and a run over several nodes hung. A task on
    rank 0's bundle picks them now, so a port taken where the driver runs does not matter."""
    pytest.importorskip("ray")
    import socket

    import ray
    from ray.util.placement_group import placement_group

    from furlong.cluster import ray_calls, ray_cluster, ray_trainer
    config = config_of(grpo_argv, "--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "1")
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        monkeypatch.setattr(ray_calls, "free_port", lambda host=None: taken.getsockname()[1])
        ray_cluster.start_ray(plan_placement(config, 0))
        try:
            group = placement_group([{"CPU": 1}, {"CPU": 1}])
            ray.get(group.ready())
            trainer = ray_trainer.RayTrainGroup(config, group, [0, 1], 0, str(tiny / "model"), 1)
            assert trainer.world_size == 2
            trainer.close()
        finally:
            ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_places_server_processes_on_engine_bundles(grpo_argv, tiny, tmp_path, monkeypatch):
    """--rollout-backend sglang under Ray: one server process per engine bundle, started
    by a ServerHost actor with the exact SGLang command (furlong's server stands in for
    SGLang here), fed weights by broadcast, stopped at the end."""
    pytest.importorskip("ray")
    from dataclasses import replace

    import psutil

    from furlong import cli
    from furlong.cluster import ray_cluster
    from furlong.engine.launcher import BUILTIN_SERVER
    original = ray_cluster.server_spec
    monkeypatch.setattr(ray_cluster, "resolve_backend", lambda options, device: "sglang")
    monkeypatch.setattr(ray_cluster, "server_spec", lambda path, options, device: original(
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

