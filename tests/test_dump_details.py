"""--dump-details DIR: a tiny run writes Miles' layout (rollout_data/{id}.pt,
train_data/{id}_0.pt) and the files hold what the run generated and trained on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from furlong import cli
from furlong.checkpoint import load_state
from furlong.output.metrics import read_metrics

from conftest import train_argv


def test_a_run_dumps_each_rollout_and_each_step(tiny, tmp_path):
    dump_dir, run_dir = tmp_path / "dump", tmp_path / "run"
    argv = train_argv(tiny, num_rollout=1, rollout_batch_size=2, n_samples_per_prompt=2,
                      run_dir=run_dir, dump_details=dump_dir)
    assert cli.main(argv) == 0
    rollout = load_state(dump_dir / "rollout_data" / "0.pt")
    train = load_state(dump_dir / "train_data" / "0_0.pt")
    assert sorted(p.name for p in dump_dir.rglob("*") if p.is_file()) == ["0.pt", "0_0.pt"]

    samples = rollout["samples"]
    assert rollout["rollout_id"] == 0 and len(samples) == 4
    data = train["rollout_data"]
    assert train["rollout_id"] == 0 and train["rank"] == 0
    # The step trained on exactly the dumped samples: same tokens, lengths, rewards.
    assert [t.tolist() for t in data["tokens"]] == [s["tokens"] for s in samples]
    assert data["response_lengths"] == [s["response_length"] for s in samples]
    assert data["rewards"].tolist() == [float(s["reward"]) for s in samples]
    assert [m.shape[0] for m in data["loss_masks"]] == data["response_lengths"]
    assert all(len(s["rollout_log_probs"]) == s["response_length"] for s in samples)
    # Metrics are those the run logged for rollout 0.
    logged = {k: v for row in read_metrics(Path(run_dir) / "metrics.jsonl")
              if row["step"] == 0 for k, v in row.items()}
    assert train["metrics"]["train/loss"] == pytest.approx(logged["train/loss"])
    assert rollout["metadata"]["metrics"]["rollout/raw_reward"] == \
        pytest.approx(logged["rollout/raw_reward"])
    assert rollout["metadata"]["metrics"]["rollout/raw_reward"] == \
        pytest.approx(torch.tensor([float(s["reward"]) for s in samples]).mean().item())
    assert [row["train/step"] for row in train["optimizer_steps"]] == [0]


def test_without_the_flag_nothing_is_dumped(tiny, tmp_path):
    argv = train_argv(tiny, num_rollout=1, rollout_batch_size=2, n_samples_per_prompt=2,
                      run_dir=tmp_path / "run")
    assert cli.main(argv) == 0
    assert not list(tmp_path.rglob("rollout_data")) and not list(tmp_path.rglob("train_data"))
