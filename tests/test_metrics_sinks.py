"""The W&B sink takes Miles' flags: key and host for this run only (no ~/.netrc), team
as the entity, a run id to resume, a directory for its files."""
from __future__ import annotations

import pytest

from furlong.config import load_config
from furlong.output.metrics import MetricsLogger

from conftest import train_argv


def test_miles_wandb_flags_reach_the_run(tiny, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    key = "k" * 40
    config = load_config(train_argv(
        tiny, "--use-wandb", "--wandb-mode", "offline", "--wandb-project", "p",
        "--wandb-key", key, "--wandb-host", "https://wandb.example.com",
        "--wandb-team", "team-a", "--wandb-run-id", "run123",
        "--wandb-dir", str(tmp_path / "wb")))[0]
    logger = MetricsLogger(tmp_path / "run", config.logging)
    try:
        run = wandb.run
        assert run.id == "run123" and run.entity == "team-a"
        assert run.settings.api_key == key
        assert run.settings.base_url == "https://wandb.example.com"
        logger.log(0, {"train/loss": 1.0})
    finally:
        logger.close()
    assert list((tmp_path / "wb/wandb").glob("offline-run-*-run123"))
    assert not (tmp_path / "home/.netrc").exists()
