"""Checks shared by the Ray run tests: every weight push leaves each engine with the
trainer's weights, and the engines' log-probs are the trainer's."""
from __future__ import annotations

from pathlib import Path

from furlong.engine.api_key import auth_headers
from furlong.engine.weights.receive import read_hf_weights

# With --lr 1e-3 engines that miss the weight pushes are off the trainer's log-probs by
# 3e-6 to 4.4e-6 (measured); engines that get them agree to 1.7e-7. The random reward
# varies within groups, so advantages are not zero and the weights move by the gradient
# (with the math reward the tiny model scores 0 everywhere); without weight decay,
# nothing else moves them.
SYNC_FLAGS = ["--lr", "1e-3", "--rm-type", "random", "--weight-decay", "0"]
SYNC_BOUND = 1e-6


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
