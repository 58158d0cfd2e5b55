"""The GPU benchmarks' --cpu-check modes, each run as its command line is: the same code
paths on a tiny model on the CPU, so that a device call does not fail on what a CPU could
have caught."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_routing_replay_cpu_check_reports_both_figures_and_replay_is_in_effect(tmp_path):
    """bench/routing_replay.py: the engine in bf16 against the trainer in float32 (as in
    tests/test_routing_replay.py) disagree on some routes; replaying the engine's routes
    leaves none differing and does not widen the log-prob gap."""
    subprocess.run([sys.executable, str(REPO / "bench/routing_replay.py"), "--cpu-check"],
                   check=True, cwd=REPO, env={**os.environ, "OUT": str(tmp_path)},
                   capture_output=True)
    results = json.loads((tmp_path / "routing_replay.json").read_text())
    metric = "train/train_rollout_logprob_abs_diff"
    own, replayed = results["without_replay"], results["with_replay"]
    assert results["response_tokens"] == 8 * 16 and results["layers"] == 2
    assert own["experts_differ"] > 0 and replayed["experts_differ"] == 0
    assert 0 < replayed[metric] <= own[metric], (replayed[metric], own[metric])
