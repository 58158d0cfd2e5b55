"""Weight sync on Ray with CPU bundles: two trainer ranks feed engines apart (by
broadcast) or colocated (by value), and every engine serves what the trainer holds."""
from __future__ import annotations

import pytest

from ray_weights import (SYNC_FLAGS, assert_engines_follow_the_trainer,
                         assert_engines_hold_the_pushed_weights, read_back_every_push)


@pytest.mark.slow
@pytest.mark.timeout(900)  # a hang guard: Ray runs on 2 loaded cores are slow
@pytest.mark.parametrize("layout, num_engines", [(("--rollout-num-gpus", "1"), 1),
                                                 (("--colocate",), 2)],
                         ids=["disaggregated", "colocated"])
def test_ray_run_syncs_weights(grpo_argv, tmp_path, monkeypatch, ray_cluster, layout,
                               num_engines):
    """Two CPU trainer ranks (FSDP2 over gloo) and one engine apart (weights by
    broadcast) or two engines on the trainers' bundles (weights by value, requests
    through the router): after each push every engine holds the trainer's weights, and
    its log-probs equal the trainer's."""
    from furlong import cli
    pushes = read_back_every_push(monkeypatch, tmp_path / "pushed")
    argv = grpo_argv + ["--actor-num-gpus-per-node", "2", *layout, *SYNC_FLAGS,
                        "--run-dir", str(tmp_path), "--num-steps-per-rollout", "2",
                        "--update-weight-buffer-size", "100000"]
    assert cli.main(argv) == 0
    assert_engines_hold_the_pushed_weights(pushes, num_engines)
    assert_engines_follow_the_trainer(tmp_path)
