"""Checkpoint publishing: the tracker is written last, a crash mid-save loses nothing; the
optimizer state of earlier versions still resumes."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from furlong import checkpoint

from conftest import policy_config, trainer_batch


def write_marker(value: str):
    def write(directory):
        (directory / "marker.txt").write_text(value)
    return write


def test_save_publishes_iteration_and_tracker(tmp_path):
    path = checkpoint.save_checkpoint(tmp_path, 7, write_marker("seven"))
    assert path == tmp_path / "iter_0000007"
    assert (tmp_path / checkpoint.TRACKER).read_text().strip() == "7"
    assert checkpoint.latest_iteration(tmp_path) == 7
    assert not (tmp_path / "iter_0000007.tmp").exists()


def test_killed_save_leaves_previous_checkpoint_latest(tmp_path):
    """Guards against a crash in the middle of a save corrupting the resume point."""
    checkpoint.save_checkpoint(tmp_path, 3, write_marker("three"))

    def crash(directory):
        (directory / "marker.txt").write_text("half")
        raise KeyboardInterrupt("killed while saving")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 4, crash)
    assert checkpoint.latest_iteration(tmp_path) == 3
    assert (tmp_path / "iter_0000003/marker.txt").read_text() == "three"
    assert not (tmp_path / "iter_0000004").exists()
    # The next save of that iteration succeeds over the leftover staging directory.
    checkpoint.save_checkpoint(tmp_path, 4, write_marker("four"))
    assert checkpoint.latest_iteration(tmp_path) == 4


def test_resave_of_same_iteration_replaces_it(tmp_path):
    checkpoint.save_checkpoint(tmp_path, 1, write_marker("a"))
    checkpoint.save_checkpoint(tmp_path, 1, write_marker("b"))
    assert (tmp_path / "iter_0000001/marker.txt").read_text() == "b"


def test_no_tracker_means_no_resume(tmp_path):
    assert checkpoint.latest_iteration(tmp_path) is None
    assert checkpoint.latest_iteration(None) is None


def test_bad_tracker_is_a_clear_error(tmp_path):
    (tmp_path / checkpoint.TRACKER).write_text("oops")
    with pytest.raises(ValueError, match="expected an iteration number"):
        checkpoint.latest_iteration(tmp_path)
    (tmp_path / checkpoint.TRACKER).write_text("5")
    with pytest.raises(ValueError, match="iter_0000005"):
        checkpoint.latest_iteration(tmp_path)


def test_a_checkpoint_of_an_earlier_version_resumes_on_its_layout(tiny, tmp_path):
    """Earlier versions saved each rank's `optimizer.state_dict()` as trainer_rank{r}.pt,
    not optimizer/part*.pt; such a checkpoint resumes to the step the new format gives."""
    from furlong.train.actor import RankInfo, TrainActor

    def actor(init: Path) -> TrainActor:
        return TrainActor(policy_config(tiny, ["--lr", "1e-3"]), RankInfo(), str(init), 3)
    trained = actor(tiny / "model")
    batch = trainer_batch(trained, 6, seed=0)
    trained.train(batch)
    trained.save(tmp_path / "new", save_optimizer=True)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    shutil.rmtree(tmp_path / "old/optimizer")
    torch.save({"optimizer": trained.optimizer.state_dict(),
                "scheduler": trained.scheduler.state_dict()}, tmp_path / "old/trainer_rank0.pt")
    weights = []  # after the second step, which Adam's restored moments shape
    for directory in (tmp_path / "new", tmp_path / "old", None):
        resumed = trained if directory is None else actor(directory / "model")
        if directory is not None:
            resumed.restore(directory)
        resumed.train(batch)
        weights.append([param.detach().clone() for param in resumed.policy.parameters()])
    for new, old, continued in zip(*weights, strict=True):
        assert torch.equal(new, old) and torch.equal(new, continued)
    (tmp_path / "old/rng_rank1.pt").write_bytes((tmp_path / "old/rng_rank0.pt").read_bytes())
    with pytest.raises(ValueError, match="state of 2 trainer ranks .* this run has 1"):
        actor(tmp_path / "old/model").restore(tmp_path / "old")  # as if two ranks saved it


def test_retain_interval_keeps_multiples_and_the_latest(tmp_path):
    """--save-retain-interval 3 after saves 0..7: 0, 3, 6 and the latest (7) stay; an
    unpublished staging directory is left alone."""
    for iteration in range(8):
        checkpoint.save_checkpoint(tmp_path, iteration, write_marker(str(iteration)))
        checkpoint.prune_checkpoints(tmp_path, 3)
    (tmp_path / "iter_0000008.tmp").mkdir()
    assert checkpoint.prune_checkpoints(tmp_path, 3) == []
    kept = sorted(path.name for path in tmp_path.glob("iter_*"))
    assert kept == ["iter_0000000", "iter_0000003", "iter_0000006", "iter_0000007",
                    "iter_0000008.tmp"]
    assert checkpoint.latest_iteration(tmp_path) == 7
    assert checkpoint.prune_checkpoints(tmp_path, None) == []


def test_optimizer_state_of_another_shape_is_refused(tmp_path):
    """A saved moment whose shape is not the parameter's (another model under the same
    names) is an error naming the directory, the parameter and both shapes."""
    from furlong.train import optimizer_state
    param = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = torch.optim.AdamW([param])
    state = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 2),
             "exp_avg_sq": torch.zeros(4, 2)}
    (tmp_path / "optimizer").mkdir()
    torch.save({"state": {"w": state}, "scheduler": {}}, tmp_path / "optimizer/part0.pt")
    with pytest.raises(ValueError, match=r"optimizer: the saved exp_avg of w is \(4, 2\), "
                                         r"the parameter \(3, 2\)"):
        optimizer_state.restore(tmp_path / "optimizer", [("w", param)], optimizer)


def test_buffered_samples_keep_their_tensors_through_a_checkpoint(tmp_path):
    """A partial-rollout buffer's routed experts (int32, routing replay) and a tensor a hook
    added come back as the same tensors, not as their printed form."""
    import numpy

    from furlong.sample import Sample
    routes = torch.randint(0, 8, (5, 2, 2), dtype=torch.int32)
    sample = Sample(group_index=3, tokens=[1, 2, 3, 4, 5, 6], response_length=2,
                    rollout_log_probs=[-0.5, -0.25], rollout_routed_experts=routes)
    sample.hook_scores = numpy.array([0.5, 1.5])
    state = {"dataset": {"epoch": 1, "offset": 4}, "next_group_index": 4,
             "buffer": [[sample.to_dict(), Sample(group_index=3).to_dict()]]}
    checkpoint.write_rollout_state(tmp_path, state)
    back = checkpoint.read_rollout_state(tmp_path)
    assert back["dataset"] == {"epoch": 1, "offset": 4} and back["next_group_index"] == 4
    restored = Sample.from_dict(back["buffer"][0][0])
    assert restored.rollout_routed_experts.dtype == torch.int32
    assert torch.equal(restored.rollout_routed_experts, routes)
    assert torch.equal(restored.hook_scores, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert restored.rollout_log_probs == [-0.5, -0.25] and restored.tokens[-1] == 6
    assert Sample.from_dict(back["buffer"][0][1]).rollout_routed_experts is None


def test_a_rollout_state_without_tensors_is_json_alone(tmp_path):
    checkpoint.write_rollout_state(tmp_path, {"dataset": None, "next_group_index": 0,
                                              "buffer": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout.json"]
    assert checkpoint.read_rollout_state(tmp_path)["buffer"] == []
