"""Checkpoint publishing: the tracker is written last, a crash mid-save loses nothing."""
from __future__ import annotations

import pytest

from furlong import checkpoint


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
