"""The demo's summary: eval scores before/after each run, and the latest score that the
demo script reads to decide whether the SFT warm-up goes on."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from furlong.output.summary import latest_score, summary_table


@pytest.fixture
def run_dir(tmp_path):
    rows = [{"step": 0, "eval/addition": 0.0}, {"step": 0, "train/loss": 3.1},
            {"step": 20, "eval/addition": 0.25, "eval/addition/pass@1": 0.25},
            {"step": 40, "eval/addition": 0.125}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_table_shows_first_and_last_eval(run_dir):
    lines = summary_table([str(run_dir)]).splitlines()
    assert len(lines) == 2  # the pass@k metric is not a row
    assert lines[1].split()[1:] == ["eval/addition", "0.000", "0.125", "+0.125"]


def test_latest_score_is_the_last_eval_and_a_missing_metric_is_an_error(run_dir):
    assert latest_score(run_dir, "eval/addition") == 0.125
    with pytest.raises(SystemExit, match="no eval/other"):
        latest_score(run_dir, "eval/other")
    printed = subprocess.run([sys.executable, "-m", "furlong.output.summary", "--last",
                              "eval/addition", str(run_dir)], capture_output=True, text=True, check=True).stdout
    assert float(printed) == 0.125
