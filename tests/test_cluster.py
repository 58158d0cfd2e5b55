"""Placement of trainer ranks and engines; multi-process runs on Ray with CPU bundles."""
from __future__ import annotations

import time

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
])
def test_impossible_layouts_are_clear_errors(grpo_argv, flags, message):
    with pytest.raises(ConfigError, match=message):
        plan_placement(config_of(grpo_argv, *flags), 8)


# ---- Ray on CPU -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--rollout-num-gpus", "1"), ("--colocate",)],
                         ids=["disaggregated", "colocated"])
def test_ray_run_syncs_weights(grpo_argv, tmp_path, layout):
    """Two CPU trainer ranks (FSDP2 over gloo) and one engine apart (weights by
    broadcast) or two engines on the trainers' bundles (weights by value, requests
    through the router): after each push the engines' log-probs equal the trainer's."""
    pytest.importorskip("ray")
    from furlong import cli
    from furlong.metrics import read_metrics
    argv = grpo_argv + ["--actor-num-gpus-per-node", "2", *layout,
                        "--run-dir", str(tmp_path), "--num-steps-per-rollout", "2",
                        "--update-weight-buffer-size", "100000"]
    assert cli.main(argv) == 0
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) >= 2
    assert max(r["train/train_rollout_logprob_abs_diff"] for r in rows) < 1e-4


@pytest.mark.slow
def test_ray_rank_death_fails_fast(grpo_argv, tmp_path, monkeypatch):
    """A trainer rank that dies ends the run at once with the role named, never a hang."""
    pytest.importorskip("ray")
    import ray

    from furlong import cli
    from furlong.cluster import ray_trainer
    original = ray_trainer.RayTrainGroup.train

    def train_then_die(self, batch):
        ray.kill(self.ranks[1])
        return original(self, batch)

    monkeypatch.setattr(ray_trainer.RayTrainGroup, "train", train_then_die)
    argv = grpo_argv + ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "1",
                        "--run-dir", str(tmp_path)]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="trainer rank 1"):
        cli.main(argv)
    assert time.monotonic() - start < 180


@pytest.mark.slow
def test_ray_trainers_feed_external_servers(grpo_argv, tiny, tmp_path):
    """Trainer ranks on Ray push weights by broadcast to a server they did not start."""
    pytest.importorskip("ray")
    import socket
    import subprocess
    import sys

    import requests

    from furlong import cli
    from furlong.metrics import read_metrics
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "furlong.engine.serve", "--model-path",
                               str(tiny / "model"), "--port", str(port), "--device", "cpu",
                               "--dtype", "float32"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        argv = grpo_argv + ["--actor-num-gpus-per-node", "2", "--rollout-external",
                            "--rollout-external-engine-addrs", f"127.0.0.1:{port}",
                            "--run-dir", str(tmp_path), "--num-steps-per-rollout", "2"]
        assert cli.main(argv) == 0
        rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
        assert max(r["train/train_rollout_logprob_abs_diff"] for r in rows) < 1e-4
        assert server.poll() is None  # an external server outlives the run
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.slow
def test_ray_async_generation_overlaps_training(grpo_argv, tmp_path):
    """train_async.py on Ray: a trainer rank and an engine in their own processes; the
    generation of rollout k+1 runs while rollout k trains, one weight version behind."""
    pytest.importorskip("ray")
    from furlong import cli
    from furlong.metrics import read_metrics
    argv = grpo_argv + ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1",
                        "--num-rollout", "4", "--run-dir", str(tmp_path)]
    assert cli.main(argv, prog="train_async.py", overlap=True) == 0
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")
            if "perf/rollout_start" in r}
    for k in range(3):
        assert rows[k + 1]["perf/rollout_start"] < rows[k]["perf/train_end"]
        assert rows[k + 1]["perf/rollout_end"] > rows[k]["perf/train_start"]
        assert rows[k + 1]["rollout/staleness"] == 1


@pytest.mark.slow
def test_ray_places_server_processes_on_engine_bundles(grpo_argv, tmp_path, monkeypatch):
    """--rollout-backend sglang under Ray: one server process per engine bundle, started
    by a ServerHost actor with the exact SGLang command (furlong's server stands in for
    SGLang here), fed weights by broadcast, stopped at the end."""
    pytest.importorskip("ray")
    from dataclasses import replace

    import psutil

    from furlong import cli
    from furlong.cluster import ray_cluster
    from furlong.engine.launcher import BUILTIN_SERVER
    from furlong.metrics import read_metrics
    original = ray_cluster.server_spec
    monkeypatch.setattr(ray_cluster, "resolve_backend", lambda options, device: "sglang")
    monkeypatch.setattr(ray_cluster, "server_spec", lambda path, options, device: original(
        path, replace(options, server_module=BUILTIN_SERVER), device))
    argv = grpo_argv + ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "2",
                        "--run-dir", str(tmp_path), "--num-steps-per-rollout", "2"]
    assert cli.main(argv) == 0
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert max(r["train/train_rollout_logprob_abs_diff"] for r in rows) < 1e-4
    model = grpo_argv[grpo_argv.index("--hf-checkpoint") + 1]
    servers = [p for p in psutil.process_iter(["cmdline"])
               if {"furlong.engine.serve", model} <= set(p.info["cmdline"] or [])]
    assert not servers  # every server process of this run stopped with it

