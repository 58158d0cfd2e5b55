"""A run resumed from a checkpoint draws the random numbers the uninterrupted run drew.

Observed through the public run, whatever the checkpoint's RNG format: a reward hook
draws `random.random()` and `torch.rand(1)` for each sample it scores and appends them
to a file. A run saved after rollout 1 and killed, then resumed, must draw in rollouts
2 and 3 what the run that never stopped drew there (and not, say, rollout 0's numbers
again, which a fresh seed gives). The hook runs on the event loop, so the draws of a
rollout are one stretch of each generator's stream; the samples may take them in any
order, so each rollout's draws are compared as a set.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import train_argv
from furlong import cli, loop

HOOK = '''
import os
import random

import torch


async def reward(args, sample):
    with open(os.environ["RNG_DRAWS"], "a") as stream:
        stream.write(f"{random.random()!r} {torch.rand(1).item()!r}\\n")
    return float(len(sample.response) % 2)
'''
NUM_ROLLOUTS, PROMPTS, SAMPLES = 4, 2, 2
DRAWS_PER_ROLLOUT = PROMPTS * SAMPLES


@pytest.fixture
def draws_hook(tmp_path, monkeypatch) -> None:
    (tmp_path / "rng_draws_hook.py").write_text(HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))


def argv_of(tiny: Path, save: Path) -> list[str]:
    return train_argv(tiny, custom_rm_path="rng_draws_hook.reward", num_rollout=NUM_ROLLOUTS,
                      rollout_batch_size=PROMPTS, n_samples_per_prompt=SAMPLES, save=save,
                      save_interval=2, load=save)


def drawn(path: Path, monkeypatch, argv: list[str]) -> list[frozenset]:
    """Run train.py `argv`; the hook's draws of each rollout it ran, in rollout order."""
    monkeypatch.setenv("RNG_DRAWS", str(path))
    try:
        assert cli.main(argv) == 0
    finally:
        lines = path.read_text().splitlines() if path.exists() else []
    assert len(lines) % DRAWS_PER_ROLLOUT == 0
    return [frozenset(lines[i:i + DRAWS_PER_ROLLOUT])
            for i in range(0, len(lines), DRAWS_PER_ROLLOUT)]


def test_resumed_run_draws_what_the_uninterrupted_run_drew(tiny, draws_hook, tmp_path,
                                                           monkeypatch):
    full = drawn(tmp_path / "full.txt", monkeypatch, argv_of(tiny, tmp_path / "full"))
    assert len(full) == NUM_ROLLOUTS and len(set(full)) == NUM_ROLLOUTS

    original = loop.save

    def save_then_die(run_, rollout_id, *args):
        original(run_, rollout_id, *args)
        if rollout_id == 1:
            raise KeyboardInterrupt("simulated kill after the checkpoint of rollout 1")

    cut_argv = argv_of(tiny, tmp_path / "cut")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            drawn(tmp_path / "cut.txt", patch, cut_argv)
    before = (tmp_path / "cut.txt").read_text().splitlines()
    assert len(before) == 2 * DRAWS_PER_ROLLOUT  # rollouts 0 and 1, then the kill
    resumed = drawn(tmp_path / "resumed.txt", monkeypatch, cut_argv)
    assert resumed == full[2:]
