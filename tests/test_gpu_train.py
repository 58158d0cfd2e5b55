"""The trainer on one GPU: packed varlen flash attention against unpacked SDPA, and the
compiled decoder layers against eager ones, in bf16."""
from __future__ import annotations

import math

import pytest
import torch

from furlong.model.loading import load_hf_model
from furlong.train import actor as actor_module
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import TrainBatch, pack, split_tokens
from furlong.train.parallel import decoder_layers
from furlong.train.policy import CausalLMPolicy
from conftest import policy_config, random_batch, reference_log_probs


@pytest.mark.gpu
def test_gpu_packed_log_probs_match_unpacked(tiny):
    packed_model = load_hf_model(str(tiny / "model"), torch.float32, "cuda", packed=True).eval()
    plain_model = load_hf_model(str(tiny / "model"), torch.float32, "cuda").eval()
    batch = random_batch(6, packed_model.config.vocab_size)
    micro = pack(batch, list(range(6)), "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        log_probs, _ = CausalLMPolicy(packed_model)(micro, temperature=1.0)
        for i, values in enumerate(split_tokens(log_probs, micro)):
            expected = reference_log_probs(plain_model, batch.tokens[i].cuda(),
                                           batch.response_lengths[i], 1.0)
            assert (values - expected).abs().mean() < 0.02


# ---- one GPU: compiled decoder layers ---------------------------------------------------
def _gpu_actor(tiny, *flags: str) -> TrainActor:
    return TrainActor(policy_config(tiny, list(flags)), RankInfo(device=torch.device("cuda")),
                      str(tiny / "model"), 4)


def _prepared(actor: TrainActor, num_samples: int, seed: int) -> TrainBatch:
    batch = random_batch(num_samples, actor.model_config.vocab_size, seed=seed)
    batch.advantages = [torch.ones_like(m) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    batch.old_log_probs, _ = actor.compute_log_probs(batch)
    return batch


@pytest.mark.gpu
def test_compiled_layers_reuse_their_graphs_for_new_micro_batch_lengths(tiny):
    """Each decoder layer is compiled with dynamic shapes: once the training and the
    no-grad forwards have run, micro-batches of other lengths (other sample counts and
    longest samples) run without recompiling."""
    actor = _gpu_actor(tiny)
    layers = [*decoder_layers(actor.policy.hf_model), *decoder_layers(actor.ref_policy.hf_model)]
    assert all(layer._compiled_call_impl is not None for layer in layers)
    actor.train(_prepared(actor, 5, seed=1))
    actor.train(_prepared(actor, 7, seed=2))
    with torch._dynamo.config.patch(error_on_recompile=True):
        (metrics,) = actor.train(_prepared(actor, 11, seed=3))
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0


@pytest.mark.gpu
def test_compiled_layers_match_the_eager_layers(tiny, monkeypatch):
    """Compiled and eager bf16 layers give the same log-probs, loss and gradient norm to
    bf16 accuracy, with and without whole-layer recomputation inside the graph."""
    compiled = _gpu_actor(tiny)
    recomputed = _gpu_actor(tiny, "--recompute-granularity", "full",
                            "--recompute-method", "uniform", "--recompute-num-layers", "1")
    monkeypatch.setattr(actor_module, "compile_decoder_layers", lambda layers: None)
    eager = _gpu_actor(tiny)
    assert all(layer._compiled_call_impl is None
               for layer in decoder_layers(eager.policy.hf_model))
    batch = _prepared(eager, 9, seed=4)
    expected_log_probs, _ = eager.compute_log_probs(batch)
    (expected,) = eager.train(batch)
    for actor in (compiled, recomputed):
        log_probs, _ = actor.compute_log_probs(batch)
        for values, reference in zip(log_probs, expected_log_probs, strict=True):
            assert (values - reference).abs().max() < 0.05
        (metrics,) = actor.train(batch)
        assert metrics["train/loss"] == pytest.approx(expected["train/loss"], rel=2e-2, abs=2e-3)
        assert metrics["train/grad_norm"] == pytest.approx(expected["train/grad_norm"], rel=5e-2)
