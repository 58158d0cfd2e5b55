"""Checkpoint layout under --save, written so that a crash never loses the last one.

    SAVE/iter_0000007/model/        HF directory (config, safetensors, tokenizer)
    SAVE/iter_0000007/optimizer/part0.pt  AdamW state by HF name + LR schedule (unless
                                    --no-save-optim; train/optimizer_state.py)
    SAVE/iter_0000007/rng_rank0.pt  python / torch / cuda RNG states, world and TP size
    SAVE/iter_0000007/rollout.json  data position, group counter, partial-rollout buffer
    SAVE/iter_0000007/rollout_tensors.pt  the tensors of that buffer's samples (routed
                                    experts, hook-added tensors), when there are any
    SAVE/iter_0000007/args.json     the command line and resolved flags
    SAVE/latest_checkpointed_iteration.txt   "7", written last

With several trainer ranks there is one rng_rank{r}.pt per global rank r, and one
optimizer part per pipeline stage. The optimizer's tensors are whole, like the model's,
so a checkpoint resumes under any layout of ranks (world size, tensor, context,
expert and pipeline parallel sizes); a rank that did not exist when it was saved starts
its RNG afresh. Checkpoints of earlier versions hold trainer_rank{r}.pt (each rank's
optimizer shards) instead, and resume on the layout that saved them.

A save fills `iter_0000007.tmp/`, renames it into place, then replaces the tracker
through a temporary file: until the rename of the tracker, the previous iteration
stays the latest, and its directory is never touched. With --save-retain-interval N,
earlier iterations that are not multiples of N are deleted only after that.

Every .pt file is read with `load_state` (`torch.load(weights_only=True)`): tensors,
numbers, strings and containers only, so a tampered checkpoint cannot run code when it
is loaded. The RNG states are such values already (Python's state is a tuple of ints).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_iteration(save_dir: str | Path | None) -> int | None:
    """The iteration the tracker names, or None when there is no tracker."""
    if save_dir is None:
        return None
    tracker = Path(save_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not iteration_dir(save_dir, iteration).is_dir():
        raise ValueError(f"{tracker} names iteration {iteration} but "
                         f"{iteration_dir(save_dir, iteration)} is missing")
    return iteration


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(save_dir: str | Path, iteration: int, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)` to fill the checkpoint, then publish it atomically."""
    final = iteration_dir(save_dir, iteration)
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    _fsync_tree(staging)
    if final.exists():  # an older save of this iteration that the tracker may name
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_atomic(Path(save_dir) / TRACKER, f"{iteration}\n")
    return final


def prune_checkpoints(save_dir: str | Path, retain_interval: int | None) -> list[Path]:
    """--save-retain-interval N (Megatron's): after a save, the earlier iterations whose
    number is not a multiple of N are deleted; the latest (the tracker's) always stays,
    as does anything not published (`.tmp`). Returns the deleted directories."""
    latest = latest_iteration(save_dir)
    if latest is None or not retain_interval:
        return []
    removed = []
    for directory in sorted(Path(save_dir).glob("iter_*")):
        number = directory.name.removeprefix("iter_")
        if number.isdigit() and int(number) < latest and int(number) % retain_interval:
            shutil.rmtree(directory)
            removed.append(directory)
    return removed


def load_state(path: str | Path, mmap: bool = False):
    """A `torch.save` file of plain values (a checkpoint's .pt files, saved rollouts), loaded
    without running code; a ValueError naming the file if it holds anything else. `mmap`:
    tensors are read from the file as they are used."""
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and "
                         f"plain values ({_refusal_reason(error)}). furlong writes only such "
                         "values; this file was written by something else or tampered "
                         "with") from None


def _refusal_reason(error: Exception) -> str:
    """The line of torch's weights_only error that names what was refused."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file")
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.startswith(boilerplate)]
    return lines[0] if lines else "not a weights-only archive"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1, default=str))


def read_json(path: Path):
    return json.loads(path.read_text())


ROLLOUT_STATE, ROLLOUT_TENSORS = "rollout.json", "rollout_tensors.pt"
TENSOR_KEY = "__tensor__"  # {"__tensor__": i}: the i-th tensor of ROLLOUT_TENSORS


def write_rollout_state(directory: Path, state: dict) -> None:
    """The rollout manager's state: JSON, with its tensors beside it in a .pt file (JSON
    would turn them into their printed form)."""
    tensors: list[torch.Tensor] = []
    write_json(directory / ROLLOUT_STATE, split_tensors(state, tensors))
    if tensors:
        torch.save(tensors, directory / ROLLOUT_TENSORS)


def read_rollout_state(directory: Path) -> dict:
    tensors_file = directory / ROLLOUT_TENSORS
    tensors = load_state(tensors_file) if tensors_file.is_file() else []
    return join_tensors(read_json(directory / ROLLOUT_STATE), tensors)


def split_tensors(value, tensors: list):
    """`value` with each tensor appended to `tensors` and replaced by its place there."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {TENSOR_KEY: len(tensors) - 1}
    if isinstance(value, dict):
        return {key: split_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(item, tensors) for item in value]
    return value


def join_tensors(value, tensors: list):
    """The inverse of `split_tensors`."""
    if isinstance(value, dict):
        if set(value) == {TENSOR_KEY}:
            return tensors[value[TENSOR_KEY]]
        return {key: join_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [join_tensors(item, tensors) for item in value]
    return value
