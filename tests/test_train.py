"""Trainer numerics: packed log-probs, split invariance of a step, batching, advantages."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from torch.distributed.tensor import DTensor

from furlong.config import load_config
from furlong.model.loading import load_hf_model
from furlong.train import microbatch
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import TrainBatch, pack, split_tokens
from furlong.train.objective import LossInputs, make_reducer, policy_objective
from furlong.train.policy import CausalLMPolicy
from furlong.train.advantage_estimator import compute_advantages

from conftest import policy_config, random_batch, reference_log_probs, train_argv


@pytest.mark.parametrize("chunk_size", [1024, 3])
def test_packed_log_probs_equal_unpacked(tiny, chunk_size):
    hf_model = load_hf_model(str(tiny / "model"), packed=True).eval()
    policy = CausalLMPolicy(hf_model, chunk_size=chunk_size)
    batch = random_batch(5, hf_model.config.vocab_size)
    micro = pack(batch, [0, 1, 2, 3, 4], "cpu")
    with torch.no_grad():
        log_probs, entropy = policy(micro, temperature=0.7)
    reference_model = load_hf_model(str(tiny / "model")).eval()  # plain sdpa, unpacked
    with torch.no_grad():
        for i, values in enumerate(split_tokens(log_probs, micro)):
            expected = reference_log_probs(reference_model, batch.tokens[i],
                                           batch.response_lengths[i], 0.7)
            torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)
    assert entropy.shape == log_probs.shape and (entropy > 0).all()


def test_packing_layout():
    batch = random_batch(3, 20)
    micro = pack(batch, [2, 0], "cpu")
    lengths = [len(batch.tokens[2]), len(batch.tokens[0])]
    assert micro.input_ids.shape == (1, sum(lengths))
    assert micro.cu_seq_lens.tolist() == [0, lengths[0], sum(lengths)]
    assert micro.position_ids[0, lengths[0]].item() == 0  # positions restart per sample
    # each target is the token after its position, and only response tokens are targets
    row = micro.input_ids[0]
    assert torch.equal(micro.targets, row[micro.target_positions + 1])
    assert len(micro.targets) == batch.response_lengths[2] + batch.response_lengths[0]
    assert torch.equal(micro.loss_mask, torch.cat([batch.loss_masks[2], batch.loss_masks[0]]))


def make_actor(tiny, extra: list[str]) -> TrainActor:
    return TrainActor(policy_config(tiny, extra), RankInfo(), str(tiny / "model"),
                      total_steps=1)


def one_step_gradients(tiny, extra: list[str], batch: TrainBatch) -> tuple[dict, dict]:
    """Metrics and gradients of one optimizer step (the update itself is skipped)."""
    torch.manual_seed(0)
    actor = make_actor(tiny, extra)
    group_ids = [i // 4 for i in range(len(batch))]
    batch.old_log_probs, _ = actor.compute_log_probs(batch)
    # Perturb so that ratios differ from 1 and clipping is exercised.
    batch.old_log_probs = [lp + 0.3 * torch.randn_like(lp) for lp in batch.old_log_probs]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    batch.advantages, _ = compute_advantages(actor.config.grpo, batch, group_ids)
    grads = {}

    def capture():
        grads.update({n: p.grad.clone() for n, p in actor.policy.named_parameters()})
        actor.optimizer.zero_grad()
        return 0.0

    actor._optimizer_step = capture
    (metrics,) = actor.train(batch)
    return metrics, grads


@pytest.mark.parametrize("per_token", [False, True])
def test_step_does_not_depend_on_micro_batch_split(tiny, per_token):
    """The loss and gradient of a step are the same for 1, 5 or 12 samples per micro-batch
    and for dynamic batching: reductions use the step's global denominators."""
    batch = random_batch(12, 22, seed=3)
    flags = ["--calculate-per-token-loss"] if per_token else []
    results = [one_step_gradients(tiny, flags + split, batch) for split in (
        ["--micro-batch-size", "1"], ["--micro-batch-size", "5"], ["--micro-batch-size", "12"],
        ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "40"])]
    reference_metrics, reference_grads = results[0]
    assert reference_metrics["train/pg_clipfrac"] > 0
    for metrics, grads in results[1:]:
        for name in ("train/loss", "train/pg_loss", "train/kl_loss", "train/entropy_loss",
                     "train/pg_clipfrac", "train/ppo_kl"):
            assert metrics[name] == pytest.approx(reference_metrics[name], rel=1e-5, abs=1e-7)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-4)


def test_token_budget_micro_batches_respect_budget_and_balance():
    rng = random.Random(1)
    lengths = {i: rng.randint(5, 60) for i in range(40)}
    bins = microbatch.token_budget_micro_batches(list(lengths), lengths, max_tokens=150)
    assert sorted(i for b in bins for i in b) == list(range(40))
    totals = [sum(lengths[i] for i in b) for b in bins]
    assert max(totals) <= 150
    assert len(bins) == microbatch.min_micro_batches(list(lengths.values()), 150)
    assert max(totals) - min(totals) <= max(lengths.values())  # balanced by length


def test_long_sample_sits_alone():
    lengths = {0: 500, 1: 10, 2: 10}
    bins = microbatch.token_budget_micro_batches([0, 1, 2], lengths, max_tokens=100)
    assert [0] in bins and sorted(i for b in bins for i in b) == [0, 1, 2]


def test_ranks_get_equal_counts_and_balanced_tokens():
    rng = random.Random(2)
    lengths = {i: rng.randint(1, 100) for i in range(16)}
    shares = microbatch.split_across_ranks(list(lengths), lengths, 4, balance=True)
    assert [len(s) for s in shares] == [4, 4, 4, 4]
    assert sorted(i for s in shares for i in s) == list(range(16))
    loads = [sum(lengths[i] for i in s) for s in shares]
    plain = [sum(lengths[i] for i in s)
             for s in microbatch.split_across_ranks(list(lengths), lengths, 4, balance=False)]
    assert max(loads) - min(loads) <= max(plain) - min(plain)
    with pytest.raises(ValueError, match="global-batch-size"):
        microbatch.split_across_ranks(list(range(6)), {i: 1 for i in range(6)}, 4, False)


def test_grpo_advantage_is_constant_per_sample(tiny):
    config, _ = load_config(train_argv(tiny, apply_chat_template=False, rollout_batch_size=2,
                                       n_samples_per_prompt=3, num_rollout=None))
    batch = random_batch(6, 22)
    tokens, scalars = compute_advantages(config.grpo, batch, [0, 0, 0, 1, 1, 1])
    for values, scalar in zip(tokens, scalars, strict=True):
        assert torch.all(values == scalar)


def test_a_rollout_of_another_size_still_takes_the_configured_steps(tiny, monkeypatch):
    """A custom generate function may return more or fewer samples than the flags imply
    (2 steps of 6): the steps split what came, every sample once, sizes within one."""
    actor = make_actor(tiny, ["--num-steps-per-rollout", "2"])
    batch = random_batch(14, 22, seed=3)
    batch.advantages = [torch.ones_like(m) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    assert len(actor.train(batch)) == 2
    seen = []
    monkeypatch.setattr(actor, "_train_step", lambda _, indices: seen.append(indices) or {})
    for size in (12, 13, 3, 1):
        seen.clear()
        actor.train(random_batch(size, 22))
        assert sorted(i for step in seen for i in step) == list(range(size))
        assert len(seen) == min(2, size) and max(map(len, seen)) - min(map(len, seen)) <= 1


def test_kl_reward_shaping_loads_the_reference_and_subtracts_the_kl(tiny):
    """--kl-coef alone (no --use-kl-loss) needs the reference model; reinforce++ with a
    baseline gives A_t = (r - group mean) - kl_coef * (old_t - ref_t) (k1), whitened over
    the loss tokens (Bessel-corrected variance, as Miles), by hand."""
    config, _ = load_config(train_argv(
        tiny, apply_chat_template=False, rollout_batch_size=2, n_samples_per_prompt=2,
        num_rollout=None, kl_loss_type="k1", advantage_estimator="reinforce_plus_plus_baseline",
        kl_coef=0.1, normalize_advantages=True))
    assert TrainActor(config, RankInfo(), str(tiny / "model"), total_steps=1).has_reference
    batch = random_batch(4, 22, seed=2)
    generator = torch.Generator().manual_seed(1)
    batch.old_log_probs, batch.ref_log_probs = (
        [torch.randn(n, generator=generator) - 2 for n in batch.response_lengths]
        for _ in range(2))
    tokens, _ = compute_advantages(config.grpo, batch, [0, 0, 1, 1])
    rewards = batch.rewards.tolist()
    means = [(rewards[0] + rewards[1]) / 2] * 2 + [(rewards[2] + rewards[3]) / 2] * 2
    raw = torch.cat([rewards[i] - means[i] - 0.1 * (old - ref) for i, (old, ref) in
                     enumerate(zip(batch.old_log_probs, batch.ref_log_probs, strict=True))])
    mask = torch.cat(batch.loss_masks)
    mean = (raw * mask).sum() / mask.sum()
    std = (((raw - mean) ** 2 * mask).sum() / (mask.sum() - 1) + 1e-8).sqrt()  # Bessel
    torch.testing.assert_close(torch.cat(tokens), (raw - mean) / std)


def test_tis_scales_each_token_loss_by_the_clipped_engine_ratio(tiny):
    """--use-tis: pg_loss = sum(mask * ppo_token_loss * clip(exp(old - rollout))) / tokens,
    here written out by hand; train/tis is the mean ratio before the clip (Miles)."""
    config = policy_config(tiny, ["--use-tis", "--tis-clip-low", "0.8", "--tis-clip", "1.2",
                                  "--calculate-per-token-loss"]).grpo
    batch = random_batch(6, vocab=22, seed=4)
    generator = torch.Generator().manual_seed(0)

    def per_token(scale: float, shift: float = 0.0) -> list[torch.Tensor]:
        return [torch.randn(n, generator=generator) * scale + shift
                for n in batch.response_lengths]
    batch.old_log_probs, batch.rollout_log_probs = per_token(0.3, -1.5), per_token(0.3, -1.5)
    batch.ref_log_probs, batch.advantages = per_token(0.3, -1.5), per_token(1.0)
    micro = pack(batch, list(range(len(batch))), torch.device("cpu"))
    fields, mask = micro.token_fields, micro.loss_mask
    log_probs = fields["old_log_probs"] + torch.randn(len(mask), generator=generator) * 0.2
    tokens = float(mask.sum())
    inputs = LossInputs(log_probs, torch.zeros_like(log_probs), micro,
                        make_reducer(micro, per_token=True, denominator=tokens))
    _, metrics = policy_objective(config, inputs)

    advantages, ratio = fields["advantages"], (log_probs - fields["old_log_probs"]).exp()
    ppo = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(
        1 - config.eps_clip, 1 + config.eps_clip_high))
    engine_ratio = (fields["old_log_probs"] - fields["rollout_log_probs"]).exp()
    weights = engine_ratio.clamp(0.8, 1.2)
    assert (weights == 0.8).any() and (weights == 1.2).any() and (weights != 1).any()
    torch.testing.assert_close(metrics["pg_loss"], (mask * ppo * weights).sum() / tokens)
    torch.testing.assert_close(metrics["tis"], (mask * engine_ratio).sum() / tokens)


def test_snapshots_give_the_log_probs_of_the_pushed_weights(tiny):
    """--keep-old-actor: after training, log-probs of an older version's snapshot equal
    those computed with that version, and the current weights come back afterwards."""
    actor = make_actor(tiny, ["--keep-old-actor", "--micro-batch-size", "12"])
    batch = random_batch(12, 22, seed=5)
    before, _ = actor.compute_log_probs(batch)
    actor.snapshot_weights(7)
    batch.advantages = [torch.ones_like(m) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    actor.train(batch)
    after, _ = actor.compute_log_probs(batch)
    old, _ = actor.compute_log_probs(batch, weights_version=7)
    again, _ = actor.compute_log_probs(batch)
    assert all(torch.equal(a, b) for a, b in zip(old, before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(again, after, strict=True))
    assert any(not torch.allclose(a, b) for a, b in zip(after, before, strict=True))
    # A version without a snapshot is an error, not a silent use of the current weights.
    with pytest.raises(RuntimeError, match="no snapshot of weights version 6"):
        actor.compute_log_probs(batch, weights_version=6)


def test_keep_old_actor_needs_every_sample_version(tiny):
    from furlong.train.rl_step import log_probs_of_generating_weights
    actor = make_actor(tiny, ["--keep-old-actor"])
    with pytest.raises(ValueError, match="sample.weight_version"):
        log_probs_of_generating_weights(actor, random_batch(2, 22), [3, None])


def moments(actor: TrainActor) -> dict[tuple[int, str], torch.Tensor]:
    """The optimizer's per-parameter state tensors (Adam's moments; `step` excluded), this
    rank's shards where they are DTensors."""
    return {(index, key): value.to_local() if isinstance(value, DTensor) else value
            for index, state in enumerate(actor.optimizer.state.values())
            for key, value in state.items() if isinstance(value, torch.Tensor) and value.dim()}


def test_offload_and_reload_keep_the_optimizer_state(tiny, monkeypatch):
    """--offload-train moves the optimizer state off the device and back unchanged: the
    next step is the same as without offloading. On a CPU machine the state never
    leaves the CPU, so a trainer told its device is "meta" shows that reload moves
    every moment to the trainer's device (meta holds no values: the moments are then
    put back by hand); the GPU test below sees both directions."""
    losses = []
    for offload in (False, True):
        torch.manual_seed(0)
        actor = make_actor(tiny, ["--micro-batch-size", "12"])
        batch = random_batch(12, 22, seed=5)
        batch.advantages = [torch.ones_like(m) for m in batch.loss_masks]
        batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
        actor.train(batch)
        if offload:
            before = {key: value.clone() for key, value in moments(actor).items()}
            assert before
            on_cpu = actor.rank
            monkeypatch.setattr(actor, "rank", replace(on_cpu, device=torch.device("meta")))
            actor.reload()
            assert {value.device.type for value in moments(actor).values()} == {"meta"}
            states = list(actor.optimizer.state.values())
            for (index, key), value in before.items():
                states[index][key] = value.clone()
            monkeypatch.setattr(actor, "rank", on_cpu)
            actor.offload()
            actor.reload()
            after = moments(actor)
            assert after.keys() == before.keys()
            assert all(torch.equal(after[key], before[key]) for key in before)
        losses.append(actor.train(batch)[0]["train/loss"])
    assert losses[0] == losses[1]


@pytest.mark.gpu
def test_offload_moves_the_optimizer_state_to_the_cpu_and_back(tiny):
    """On a GPU: offload leaves every moment on the CPU (and frees the device memory
    they held), reload brings each back to the GPU with its values."""
    actor = TrainActor(policy_config(tiny, []), RankInfo(device=torch.device("cuda")),
                       str(tiny / "model"), 2)
    batch = random_batch(12, actor.model_config.vocab_size, seed=5)
    batch.advantages = [torch.ones_like(m) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    actor.train(batch)
    before = {key: value.cpu() for key, value in moments(actor).items()}
    assert before and {v.device.type for v in moments(actor).values()} == {"cuda"}
    allocated = torch.cuda.memory_allocated()
    actor.offload()
    torch.cuda.synchronize()
    assert {v.device.type for v in moments(actor).values()} == {"cpu"}
    assert torch.cuda.memory_allocated() < allocated
    actor.reload()
    torch.cuda.synchronize()
    after = moments(actor)
    assert {v.device.type for v in after.values()} == {"cuda"}
    assert all(torch.equal(after[key].cpu(), before[key]) for key in before)


def test_reset_optimizer_states_makes_each_rollout_start_adam_afresh(tiny, tmp_path):
    """--reset-optimizer-states (Miles'): the second rollout's step from weights W is the
    step a fresh optimizer takes from W (constant learning rate), and differs from the step
    of an optimizer that kept its moments."""
    from test_parallel import prepared_batch
    batch = prepared_batch(tiny)
    flags = ["--lr", "1e-2"]

    def actor(extra: list[str], init=tiny / "model") -> TrainActor:
        return TrainActor(policy_config(tiny, [*flags, *extra]), RankInfo(), str(init), 4)

    def weights(trainer: TrainActor) -> dict:
        return {n: p.detach().clone() for n, p in trainer.policy.hf_model.named_parameters()}
    reset, kept = actor(["--reset-optimizer-states"]), actor([])
    for trainer in (reset, kept):
        trainer.train(batch)
    reset.export_hf(tmp_path / "after_one")
    assert weights(reset).keys() and all(torch.equal(a, b) for a, b in zip(
        weights(reset).values(), weights(kept).values(), strict=True))
    fresh = actor([], init=tmp_path / "after_one")
    for trainer in (reset, kept, fresh):
        trainer.train(batch)
    for name, value in weights(fresh).items():
        torch.testing.assert_close(weights(reset)[name], value, rtol=1e-5, atol=1e-7)
    assert not all(torch.allclose(weights(kept)[n], v) for n, v in weights(fresh).items())


def test_disable_rewards_normalization_takes_the_raw_rewards(tiny):
    """--disable-rewards-normalization (Miles'): GRPO's advantage is the reward itself."""
    grpo = load_config(train_argv(tiny, "--disable-rewards-normalization"))[0].grpo
    batch = random_batch(6, 50, seed=4)
    advantages, scalars = compute_advantages(grpo, batch, [0, 0, 0, 1, 1, 1])
    assert torch.equal(scalars, batch.rewards)
    for advantage, reward in zip(advantages, batch.rewards, strict=True):
        assert torch.equal(advantage, torch.full_like(advantage, float(reward)))
