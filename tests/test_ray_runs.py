"""Runs on Ray CPU bundles in other roles: the trainer feeds servers someone else runs, and
generation overlaps training (train_async.py). The failure runs are in
test_ray_runs_failures.py, the weight-sync ones in test_cluster_sync.py."""
from __future__ import annotations

import time

import pytest

from ray_weights import (SYNC_FLAGS, assert_engines_follow_the_trainer,
                         assert_engines_hold_the_pushed_weights, read_back_every_push)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_trainers_feed_external_servers(grpo_argv, tiny, tmp_path, monkeypatch,
                                            ray_cluster):
    """Trainer ranks on Ray push weights by broadcast to a server they did not start."""
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
def test_ray_async_generation_overlaps_training(grpo_argv, tmp_path, ray_cluster):
    """train_async.py on Ray: a trainer rank and an engine in their own processes; the
    generation of rollout k+1 runs while rollout k trains, one weight version behind."""
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
