"""Miles' trainer-side flags act with Miles' meaning, or warn once saying what runs instead:
--gradient-checkpointing, --seq-length, --recompute-num-layers, --deterministic-mode,
--train-env-vars, --bf16, --attn-implementation. No Ray, no process groups."""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from conftest import random_batch, train_argv
from furlong.build import build_in_process
from furlong.config import load_config
from furlong.hooks import load_hooks
from furlong.train.parallel import decoder_layers
from furlong.train.process_env import prepare_trainer_process


def _load(tiny, *extra: str):
    return load_config(train_argv(tiny, *extra))


def _warnings_naming(warnings: list[str], name: str) -> list[str]:
    return [w for w in warnings if w.startswith(name + " ") or w.startswith(name + ":")]


@pytest.fixture
def restore_process_state():
    """Deterministic-kernel settings and os.environ as they were before the test."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with mock.patch.dict(os.environ):
        yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def _one_process_trainer(tiny, *extra: str):
    """The TrainActor of a one-process run (build.py's path), no engine."""
    config, _ = _load(tiny, *extra)
    trainer, engine = build_in_process(config, load_hooks(config), None,
                                       str(tiny / "model"), 2, trains=True, generates=False)
    assert engine is None
    return trainer


def _checkpointed(layer) -> bool:
    return "forward" in vars(layer)  # apply_activation_checkpointing wraps the instance's


# ---- --gradient-checkpointing -------------------------------------------------------------
def test_gradient_checkpointing_derives_full_uniform_recomputation(tiny):
    config, warnings = _load(tiny, "--gradient-checkpointing")
    assert (config.perf.recompute_granularity, config.perf.recompute_method) == ("full",
                                                                                "uniform")
    assert config.sources["perf.recompute_granularity"] == "derived"
    assert config.sources["perf.recompute_method"] == "derived"
    assert _warnings_naming(warnings, "--gradient-checkpointing") == []


@pytest.mark.parametrize("extra, expected", [
    (["--recompute-granularity", "selective"], ("selective", None)),
    (["--recompute-method", "block", "--recompute-num-layers", "1"], ("full", "block")),
])
def test_gradient_checkpointing_keeps_the_recompute_flags_given(tiny, extra, expected):
    config, _ = _load(tiny, "--gradient-checkpointing", *extra)
    assert (config.perf.recompute_granularity, config.perf.recompute_method) == expected


def test_without_gradient_checkpointing_nothing_is_recomputed(tiny):
    config, _ = _load(tiny)
    assert config.perf.recompute_granularity is None


# ---- one-process trainer: recomputation, determinism, environment ---------------------------
def test_one_process_trainer_takes_the_flags(tiny, restore_process_state):
    """--gradient-checkpointing wraps every decoder layer in the recomputation,
    --deterministic-mode turns deterministic kernels on, --train-env-vars reach os.environ
    (values as strings), all before the model is built."""
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    os.environ["NCCL_ALGO"] = "Tree"  # the user's environment wins over the default
    torch.use_deterministic_algorithms(False)
    trainer = _one_process_trainer(tiny, "--gradient-checkpointing", "--deterministic-mode",
                                   "--train-env-vars", '{"FURLONG_TEST_VAR": 3}')
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["NCCL_ALGO"] == "Tree"
    assert os.environ["FURLONG_TEST_VAR"] == "3"
    layers = decoder_layers(trainer.policy.hf_model)
    assert len(layers) > 1 and all(_checkpointed(layer) for layer in layers)


def test_one_process_trainer_without_the_flags(tiny, restore_process_state):
    torch.use_deterministic_algorithms(False)
    trainer = _one_process_trainer(tiny)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "FURLONG_TEST_VAR" not in os.environ
    assert not any(_checkpointed(layer) for layer in decoder_layers(trainer.policy.hf_model))


def test_train_env_vars_override_the_environment(tiny, restore_process_state):
    os.environ["FURLONG_TEST_VAR"] = "old"
    config, _ = _load(tiny, "--train-env-vars", '{"FURLONG_TEST_VAR": "new", "B": true}')
    prepare_trainer_process(config)
    assert (os.environ["FURLONG_TEST_VAR"], os.environ["B"]) == ("new", "True")


@pytest.mark.gpu
def test_gpu_deterministic_mode_repeats_a_train_step_bit_for_bit(tiny, restore_process_state):
    """One GPU (bf16 on float32 masters, compiled layers) under --deterministic-mode: no
    kernel of a train step lacks a deterministic version (that would raise), and two fresh
    trainers give the same loss, gradient norm and weights to the bit."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        trainer = _one_process_trainer(tiny, "--deterministic-mode")
        batch = random_batch(8, trainer.model_config.vocab_size, seed=0)
        batch.advantages = [torch.linspace(-1, 1, len(m)) for m in batch.loss_masks]
        batch.old_log_probs, _ = trainer.compute_log_probs(batch)
        (metrics,) = trainer.train(batch)
        runs.append(((metrics["train/loss"], metrics["train/grad_norm"]),
                     [weight.cpu() for _, weight in trainer.named_weights()]))
        del trainer
    (first_metrics, first_weights), (second_metrics, second_weights) = runs
    assert first_metrics == second_metrics
    assert all(torch.equal(a, b) for a, b in zip(first_weights, second_weights, strict=True))


# ---- Ray trainer ranks (options only; Ray is not started) ---------------------------------
def test_ray_trainer_ranks_get_train_env_vars_as_strings(tiny):
    from furlong.cluster.ray_trainer import rank_options
    config, _ = _load(tiny, "--train-env-vars", '{"NCCL_ALGO": "Ring", "N": 2}')
    options = rank_options(config, None, 1, 1.0)
    assert options["runtime_env"] == {"env_vars": {"NCCL_ALGO": "Ring", "N": "2"}}
    assert (options["num_gpus"], options["scheduling_strategy"].placement_group_bundle_index) \
        == (1.0, 1)
    plain, _ = _load(tiny)
    assert "runtime_env" not in rank_options(plain, None, 0, 1.0)


# ---- flags that act in part: one warning each, saying why ----------------------------------
def test_seq_length_warns_once_that_lengths_come_from_the_data(tiny):
    _, warnings = _load(tiny, "--seq-length", "4096")
    mine = _warnings_naming(warnings, "--seq-length")
    assert len(mine) == 1 and "--max-tokens-per-gpu" in mine[0]


@pytest.mark.parametrize("extra, warns", [
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "2"], "own unit"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform",
      "--recompute-num-layers", "1"], None),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "2"], None),  # block: the first 2 layers (acts)
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], "full only"),
    (["--recompute-num-layers", "2"], "full only"),
])
def test_recompute_num_layers_warns_where_it_cannot_act(tiny, extra, warns):
    _, warnings = _load(tiny, *extra)
    mine = _warnings_naming(warnings, "--recompute-num-layers")
    assert len(mine) == (warns is not None)
    assert warns is None or warns in mine[0]


@pytest.mark.parametrize("cuda, warns", [(False, True), (True, False)])
def test_bf16_warns_only_without_cuda(tiny, monkeypatch, cuda, warns):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    _, warnings = _load(tiny, "--bf16")
    mine = _warnings_naming(warnings, "--bf16")
    assert len(mine) == warns and (not warns or "float32" in mine[0])


def test_attn_implementation_warns_naming_what_runs(tiny):
    _, warnings = _load(tiny, "--attn-implementation", "sdpa")
    mine = _warnings_naming(warnings, "--attn-implementation")
    assert len(mine) == 1 and "varlen" in mine[0]
    _, warnings = _load(tiny, "--attn-implementation", "flash_attention_2")
    assert _warnings_naming(warnings, "--attn-implementation") == []
