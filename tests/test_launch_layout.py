"""What a launch script's cluster flags make of a run (one process, or Ray), and what
--dry-run says about it: one story, and "valid" only for a layout that will start."""
from __future__ import annotations

import pytest

from furlong import dry_run
from furlong.cluster.placement import plan_placement
from furlong.config import ConfigError, load_config

from conftest import train_argv


def dry_run_output(tiny, capsys, monkeypatch, *flags: str) -> str:
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    assert dry_run.dry_run(load_config(train_argv(tiny, *flags))[0]) == 0
    return capsys.readouterr().out


def test_engine_size_of_one_alone_keeps_one_process(tiny, capsys, monkeypatch):
    """The seed's SGLANG_ARGS give --rollout-num-gpus-per-engine 1 (its default) without
    cluster flags: one process, and the dry run says so once, without contradiction."""
    flags = ("--rollout-num-gpus-per-engine", "1")
    assert plan_placement(load_config(train_argv(tiny, *flags))[0], 0).in_process
    out = dry_run_output(tiny, capsys, monkeypatch, *flags)
    assert "devices: no cluster flags: one process on the CPU" in out
    assert "layout: one process on cpu" in out
    assert "dry run: configuration is valid" in out
    devices = [line for line in out.splitlines() if line.startswith(("devices:", "layout:"))]
    assert len(devices) == 2 and not any("needs" in line for line in devices)


def test_engines_of_several_gpus_need_cluster_flags(tiny):
    with pytest.raises(ConfigError, match="--rollout-num-gpus-per-engine 2 without cluster "
                                          "flags.*--colocate or --rollout-num-gpus"):
        plan_placement(load_config(train_argv(tiny, "--rollout-num-gpus-per-engine", "2"))[0],
                       0)


def test_colocated_engines_of_several_gpus_are_a_valid_layout(tiny, capsys, monkeypatch):
    """Miles' standard layout: engines of 2 GPUs on the trainer's GPUs, fed by the ranks
    on those GPUs; offload on as --colocate implies."""
    out = dry_run_output(tiny, capsys, monkeypatch, "--actor-num-gpus-per-node", "4",
                         "--colocate", "--rollout-num-gpus-per-engine", "2")
    assert "engines:" in out and "dry run: configuration is valid" in out


def test_a_layout_that_would_stop_before_ray_is_not_valid(tiny, monkeypatch):
    """Engines of 2 GPUs of their own have no stand-in without GPUs: refused by the dry
    run itself (not a warning followed by "valid"), naming the flags."""
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    config = load_config(train_argv(tiny, "--actor-num-gpus-per-node", "2", "--rollout-num-gpus",
                                    "4", "--rollout-num-gpus-per-engine", "2"))[0]
    with pytest.raises(ConfigError, match="--rollout-num-gpus-per-engine 2 with --rollout-backend"):
        dry_run.dry_run(config)


def test_a_ray_layout_prints_what_it_needs(tiny, capsys, monkeypatch):
    out = dry_run_output(tiny, capsys, monkeypatch, "--actor-num-gpus-per-node", "2",
                         "--rollout-num-gpus", "1")
    assert "devices: the run needs 3 GPUs on 1 node(s): 2 trainer GPUs + 1 engine GPUs" in out
    assert "layout: 2 trainer ranks and 1 engine(s) of 1 cpu device(s) each" in out
    assert "dry run: configuration is valid" in out
