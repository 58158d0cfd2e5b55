"""Shared fixtures and helpers: the embedded tiny model and task (written once per test
session), the tiny train.py command line, random train batches."""
from __future__ import annotations

import os
import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from furlong.cluster.placement import Placement
from furlong.engine.fast import FastEngine
from furlong.tiny import write_tiny
from furlong.train.batch import TrainBatch

REPO = Path(__file__).resolve().parents[1]


def run_check(code: str, done: str, env: dict | None = None, timeout: int = 300) -> None:
    """Run `code` in a fresh Python from the repository root with `env` added (Triton's
    interpreter must be chosen before triton is imported); it must print `done`."""
    import sys
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)
    assert done in result.stdout, result.stderr[-3000:]


# Ray starts its workers (the trainer ranks and engines of a Ray run) at niceness 15:
# beside the other pytest workers on 2 busy cores they got ~1/28 of a core, and a run of
# 18 s alone took 200-400 s in the suite. Set before any test starts Ray.
os.environ.setdefault("RAY_worker_niceness", "0")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Three workers on two cores: one thread each instead of all fighting for both cores.
    torch.set_num_threads(1)


# The files of the longest runs (Ray, end to end, spawned ranks), longest first: xdist
# hands out files in collection order, so these start at once instead of ending the run.
LONGEST_FIRST = ("test_tiny_tools.py", "test_e2e.py", "test_ray_runs_failures.py",
                 "test_cluster_sync.py", "test_sglang.py", "test_ray_runs.py",
                 "test_cluster_servers.py", "test_lora.py", "test_context_parallel.py",
                 "test_expert_parallel.py", "test_pipeline_parallel.py",
                 "test_colocated_engines.py", "test_optimizer_offload.py",
                 "test_lora_parallel.py", "test_miles_hooks.py", "test_lora_engine.py",
                 "test_agentic.py", "test_openai_api.py", "test_sessions.py")


def pytest_configure(config):
    # pytest-xdist (3.7+) otherwise hands out the files with the most tests first, which
    # puts the long files of few tests (LONGEST_FIRST) last, to end the run on one worker.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within files
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The widest layout of the Ray runs here: 2 colocated ranks of 2 CPUs each (or 2 trainer
# ranks and 2 engines apart), so start_ray reserves 4 CPUs (or os.cpu_count(), if more).
WIDEST_RAY_RUN = Placement(trainer_ranks=2, num_engines=2, devices_per_engine=1, device="cpu",
                           colocate=True, in_process=False)


@pytest.fixture
def ray_cluster():
    """A local Ray cluster that the Ray runs of one pytest process share: the first test
    that asks starts it, train.py joins it (and leaves it up), Ray stops it at exit. Each
    run saves Ray's start and stop, ~10 s of 2 cores. A test that leaves bundles reserved
    (a run that failed half-way) stops it, so that it cannot starve the next."""
    ray = pytest.importorskip("ray")
    from ray.util.placement_group import placement_group_table

    from furlong.cluster.ray_cluster import start_ray
    start_ray(WIDEST_RAY_RUN)
    yield
    if any(group["state"] != "REMOVED" for group in placement_group_table().values()):
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """OUT_DIR of `python -m furlong.tiny OUT_DIR --seed 0`: model/ and data/."""
    return write_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    """OUT_DIR of `python -m furlong.tiny OUT_DIR --seed 0 --moe`: a Qwen3-MoE model/ and data/."""
    return write_tiny(tmp_path_factory.mktemp("tiny_moe"), seed=0, moe=True)


def model_args(script: str = "tiny.sh") -> list[str]:
    """The MODEL_ARGS array that scripts/models/`script` defines, as bash sources it."""
    printed = subprocess.run(
        ["bash", "-c", 'source "$1" && printf "%s\\0" "${MODEL_ARGS[@]}"', "model_args",
         str(REPO / "scripts/models" / script)], check=True, capture_output=True, text=True)
    return printed.stdout.split("\0")[:-1]


def train_argv(tiny: Path, *extra: str, **flags) -> list[str]:
    """The tiny GRPO command line of train.py: the tiny model on the tiny task's prompts
    (math reward, chat template), 4 prompts x 4 samples of up to 8 tokens, 2 rollouts.

    Each keyword sets the flag of its name (`rollout_batch_size=3` gives
    `--rollout-batch-size 3`, `True` a bare switch) or, given None or False, leaves the
    flag out; `extra` flags (those of several values) follow as they are."""
    given = {"hf_checkpoint": tiny / "model", "prompt_data": tiny / "data/train.jsonl",
             "input_key": "prompt", "label_key": "label", "apply_chat_template": True,
             "rm_type": "math", "rollout_batch_size": 4, "n_samples_per_prompt": 4,
             "rollout_max_response_len": 8, "num_rollout": 2}
    argv = []
    for name, value in {**given, **flags}.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv + list(extra)


# train_argv's keywords for SFT instead of GRPO: message rows, the SFT loss, no reward,
# one sample per prompt.
SFT_FLAGS = {"input_key": "messages", "label_key": None, "rm_type": None,
             "n_samples_per_prompt": None, "loss_type": "sft_loss"}


@pytest.fixture
def grpo_argv(tiny) -> list[str]:
    """A small valid GRPO command line on the tiny task."""
    return train_argv(tiny)


def policy_config(tiny: Path, extra: list[str]):
    """The config of a policy-loss step on the tiny task with every loss term on (KL to
    the reference, entropy, asymmetric clipping), plus `extra` flags."""
    from furlong.config import load_config
    argv = train_argv(tiny, *extra, apply_chat_template=False, rollout_batch_size=3,
                      num_rollout=1, use_kl_loss=True, kl_loss_coef=0.1,
                      kl_loss_type="low_var_kl", entropy_coef=0.01, eps_clip_high=0.28)
    return load_config(argv)[0]


def random_batch(num_samples: int, vocab: int, seed: int = 0) -> TrainBatch:
    """Samples with random prompt/response lengths, rewards in {0, 1}."""
    rng = random.Random(seed)
    tokens, responses, masks = [], [], []
    for _ in range(num_samples):
        prompt, response = rng.randint(3, 12), rng.randint(1, 9)
        tokens.append(torch.tensor([rng.randrange(vocab) for _ in range(prompt + response)]))
        responses.append(response)
        mask = torch.ones(response)
        if response > 2:
            mask[rng.randrange(response)] = 0.0  # a forced (non-sampled) token
        masks.append(mask)
    rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(num_samples)])
    return TrainBatch(tokens, responses, masks, rewards)


def trainer_batch(actor, num_samples: int, seed: int) -> TrainBatch:
    """`random_batch` ready for a policy-loss step of `actor`: seeded random advantages and
    the reference log-probs of `actor`."""
    batch = random_batch(num_samples, actor.model_config.vocab_size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    batch.advantages = [torch.randn(len(m), generator=generator) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    return batch


def write_teacher(tiny: Path, directory: Path) -> Path:
    """The tiny model with peaked next-token distributions (`sharpened_state`), as an HF
    directory: a teacher for on-policy distillation that differs from the student."""
    from furlong.model.loading import load_hf_model
    from furlong.tiny import sharpened_state
    model = load_hf_model(str(tiny / "model"))
    model.load_state_dict(sharpened_state(tiny / "model"), strict=False)  # a tied head
    model.save_pretrained(directory)
    return directory


def reference_log_probs(hf_model, tokens: torch.Tensor, response: int,
                        temperature: float) -> torch.Tensor:
    """Independent computation: one unpacked forward, full logits, log_softmax."""
    logits = hf_model(tokens[None]).logits[0].float() / temperature
    log_probs = logits.log_softmax(-1)[:-1].gather(-1, tokens[1:, None]).squeeze(-1)
    return log_probs[-response:]


@contextmanager
def slowed(engine, on_step, seconds: float = 0.01):
    """Every model step of `engine` (a forward of the HF engine, a decode window of the
    fast engine) first calls `on_step()` and sleeps `seconds`."""
    def pause(*_, **__):
        on_step()
        time.sleep(seconds)

    if isinstance(engine, FastEngine):
        window = engine.runner.decode_window
        engine.runner.decode_window = lambda *args: (pause(), window(*args))[1]
        try:
            yield
        finally:
            del engine.runner.decode_window
    else:
        handle = engine.model.register_forward_pre_hook(pause, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
