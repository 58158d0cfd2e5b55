"""Runs on Ray CPU bundles that meet trouble or other roles: a trainer rank or an engine
dies, the trainer feeds servers someone else runs, generation overlaps training
(train_async.py). Split from test_cluster.py so that the two pytest workers share the
Ray runs."""
from __future__ import annotations

import time

import pytest

from test_cluster import (SYNC_FLAGS, assert_engines_follow_the_trainer,
                          assert_engines_hold_the_pushed_weights, read_back_every_push)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_rank_death_fails_fast(grpo_argv, tmp_path, monkeypatch):
    """A trainer rank that dies ends the run at once with the role named, never a hang."""
    pytest.importorskip("ray")
    import ray

    from furlong.cluster import ray_trainer
    original = ray_trainer.RayTrainGroup.train

    def train_then_die(self, batch):
        ray.kill(self.ranks[1])
        return original(self, batch)

    monkeypatch.setattr(ray_trainer.RayTrainGroup, "train", train_then_die)
    fails_fast(grpo_argv + ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "1",
                            "--run-dir", str(tmp_path)], "trainer rank 1")


def fails_fast(argv: list[str], match: str) -> None:
    """train.py `argv` ends with an error matching `match` (a hang is caught by the
    test's timeout mark, not by timing the run)."""
    from furlong import cli
    with pytest.raises(RuntimeError, match=match):
        cli.main(argv)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
@pytest.mark.parametrize("met_by", ["push", "request"])
def test_ray_engine_death_fails_fast(grpo_argv, tmp_path, monkeypatch, met_by):
    """Regression: an engine actor that died was reported as trainer rank 0's refused
    connection. Killed before a training step, the next weight push meets it; killed
    after a push, the next request: either way the run ends naming the engine and Ray's
    cause."""
    pytest.importorskip("ray")
    import ray

    from furlong.cluster.ray_trainer import RayTrainGroup
    train, push_weights = RayTrainGroup.train, RayTrainGroup.push_weights

    def kill_then_train(self, batch):
        ray.kill(self.engine_actors[0])
        return train(self, batch)

    async def push_then_kill(self, engine, version):
        await push_weights(self, engine, version)
        ray.kill(self.engine_actors[0])

    if met_by == "push":
        monkeypatch.setattr(RayTrainGroup, "train", kill_then_train)
    else:
        monkeypatch.setattr(RayTrainGroup, "push_weights", push_then_kill)
    fails_fast(grpo_argv + ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1",
                            "--run-dir", str(tmp_path)], "engine 0 failed: .*actor")


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_run_goes_on_when_one_of_two_engines_dies(grpo_argv, tmp_path, monkeypatch):
    """Engine 0 dies after the first push: its requests go to engine 1, the router drops
    it, and later pushes reach only the live engine; the run completes."""
    pytest.importorskip("ray")
    import ray

    from furlong import cli
    from furlong.cluster.ray_trainer import RayTrainGroup
    from furlong.output.metrics import read_metrics
    push_weights = RayTrainGroup.push_weights

    async def push_then_kill(self, engine, version):
        await push_weights(self, engine, version)
        if version == 0:
            ray.kill(self.engine_actors[0])

    monkeypatch.setattr(RayTrainGroup, "push_weights", push_then_kill)
    argv = grpo_argv + ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "2",
                        "--num-rollout", "3", "--run-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    rollouts = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "perf/step_time" in r]
    assert [r["step"] for r in rollouts] == [0, 1, 2]
    assert all(r["perf/update_weights_time"] > 0 for r in rollouts)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_trainers_feed_external_servers(grpo_argv, tiny, tmp_path, monkeypatch):
    """Trainer ranks on Ray push weights by broadcast to a server they did not start."""
    pytest.importorskip("ray")
    import socket
    import subprocess
    import sys

    from furlong import cli
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "furlong.engine.serve", "--model-path",
                               str(tiny / "model"), "--port", str(port), "--device", "cpu",
                               "--dtype", "float32"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    pushes = read_back_every_push(monkeypatch, tmp_path / "pushed")
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}")
        argv = grpo_argv + ["--actor-num-gpus-per-node", "2", "--rollout-external",
                            "--rollout-external-engine-addrs", f"127.0.0.1:{port}",
                            *SYNC_FLAGS, "--run-dir", str(tmp_path),
                            "--num-steps-per-rollout", "2"]
        assert cli.main(argv) == 0
        assert_engines_hold_the_pushed_weights(pushes, 1)
        assert_engines_follow_the_trainer(tmp_path)
        assert server.poll() is None  # an external server outlives the run
    finally:
        server.terminate()
        server.wait(120)


def wait_healthy(server, url: str, timeout_s: float = 300.0) -> None:
    """Poll /health until the server at `url` answers (fails if it exits first)."""
    import requests
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, f"the server exited with code {server.returncode}"
        try:
            if requests.get(f"{url}/health", timeout=10).ok:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up in {timeout_s:.0f} s"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_async_generation_overlaps_training(grpo_argv, tmp_path):
    """train_async.py on Ray: a trainer rank and an engine in their own processes; the
    generation of rollout k+1 runs while rollout k trains, one weight version behind."""
    pytest.importorskip("ray")
    from furlong import cli
    from furlong.output.metrics import read_metrics
    argv = grpo_argv + ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1",
                        "--num-rollout", "4", "--run-dir", str(tmp_path)]
    assert cli.main(argv, prog="train_async.py", overlap=True) == 0
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")
            if "perf/rollout_start" in r}
    for k in range(3):
        assert rows[k + 1]["perf/rollout_start"] < rows[k]["perf/train_end"]
        assert rows[k + 1]["perf/rollout_end"] > rows[k]["perf/train_start"]
        assert rows[k + 1]["rollout/staleness"] == 1
