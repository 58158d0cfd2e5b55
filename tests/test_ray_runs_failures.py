"""Runs on Ray CPU bundles that meet trouble: a trainer rank or an engine dies, and the run
ends naming it or, with another engine left, goes on."""
from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
def test_ray_rank_death_fails_fast(grpo_argv, tmp_path, monkeypatch, ray_cluster):
    """A trainer rank that dies ends the run at once with the role named, never a hang."""
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
def test_ray_engine_death_fails_fast(grpo_argv, tmp_path, monkeypatch, ray_cluster, met_by):
    """Regression: an engine actor that died was reported as trainer rank 0's refused
    connection. Killed before a training step, the next weight push meets it; killed
    after a push, the next request: either way the run ends naming the engine and Ray's
    cause."""
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
def test_ray_run_goes_on_when_one_of_two_engines_dies(grpo_argv, tmp_path, monkeypatch,
                                                      ray_cluster):
    """Engine 0 dies after the first push: its requests go to engine 1, the router drops
    it, and later pushes reach only the live engine; the run completes."""
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
