"""Shared fixtures: the embedded tiny model and task, written once per test session."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from furlong.tiny import write_tiny

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """OUT_DIR of `python -m furlong.tiny OUT_DIR --seed 0`: model/ and data/."""
    return write_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def model_args() -> list[str]:
    """The MODEL_ARGS array of scripts/models/tiny.sh."""
    text = (REPO / "scripts/models/tiny.sh").read_text()
    return shlex.split(text.split("MODEL_ARGS=(")[1].split(")")[0], comments=True)


@pytest.fixture
def grpo_argv(tiny) -> list[str]:
    """A small valid GRPO command line on the tiny task."""
    return [
        "--hf-checkpoint", str(tiny / "model"),
        "--prompt-data", str(tiny / "data/train.jsonl"),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--rm-type", "math", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
        "--rollout-max-response-len", "8", "--num-rollout", "2",
    ]
