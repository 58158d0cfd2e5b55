"""Tests of furlong.algo and of the wiring built from it (furlong.train.objective,
furlong.train.advantage_estimator): each function against a slow per-element reference written
here with Python floats and loops (the formulas of docs/algorithm.md, which are Miles'
unless it says otherwise), plus hand-computed values, gradients, edge cases (equal
rewards, empty responses, non-finite values on masked-out tokens), and the invariance
of the reduced loss to how a global batch is split into micro-batches."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from furlong.algo import advantages as adv
from furlong.algo import losses
from furlong.config.groups import GrpoArgs
from furlong.rollout.filters import check_reward_nonzero_std
from furlong.rollout.stats import reward_stats, rollout_stats
from furlong.sample import Sample
from furlong.train.batch import TrainBatch, pack
from furlong.train.objective import LossInputs, make_reducer, policy_objective
from furlong.train.advantage_estimator import compute_advantages

SEEDS = range(5)
F64 = torch.float64


# ---------------------------------------------------------------- random inputs

def random_sample_ids_and_mask(seed: int, num_samples: int = 6, max_length: int = 7):
    """(sample_ids, mask) with random lengths; an even seed masks out all of sample 1."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_length + 1, (num_samples,), generator=g)
    sample_ids = torch.repeat_interleave(torch.arange(num_samples), lengths)
    mask = (torch.rand(sample_ids.shape[0], generator=g) < 0.7).to(F64)
    if seed % 2 == 0:
        mask[sample_ids == 1] = 0
    return sample_ids, mask


def randn(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def token_lists(sample_ids: torch.Tensor) -> list[list[int]]:
    """Token indices of each sample slot, in order."""
    tokens: list[list[int]] = [[] for _ in range(int(sample_ids.max()) + 1)]
    for t, s in enumerate(sample_ids.tolist()):
        tokens[s].append(t)
    return tokens


# ---------------------------------------------------------------- slow references

def ref_std(values: list[float]) -> float:
    """Unbiased standard deviation in Python floats (float64)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ref_zero_std(group: list[float]) -> bool:
    return len(group) < 2 or not ref_std(group) > 1e-8


def ref_grpo(rewards: list[list[float]], normalize_std: bool, eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        if ref_zero_std(group):
            out.append([0.0] * len(group))
            continue
        mean = sum(group) / len(group)
        centered = [r - mean for r in group]
        if normalize_std:
            centered = [c / (ref_std(group) + eps) for c in centered]
        out.append(centered)
    return out


def ref_grpo_by_group_id(rewards: list[float], group_ids: list[int], normalize_std: bool,
                         eps: float) -> list[float]:
    """ref_grpo of each group gathered by id, written back to the samples' slots."""
    out = [0.0] * len(rewards)
    for group in set(group_ids):
        slots = [i for i, g in enumerate(group_ids) if g == group]
        for i, value in zip(slots, ref_grpo([[rewards[i] for i in slots]], normalize_std,
                                            eps)[0], strict=True):
            out[i] = value
    return out


def ref_shaping_kl(old, ref, mask, kind) -> list[float]:
    """KL of every token; 0 on a masked-out token whose KL is not finite."""
    out = []
    for o, r, m in zip(old.tolist(), ref.tolist(), mask.tolist(), strict=True):
        kl = ref_kl(o - r, kind)
        out.append(kl if m == 1 or math.isfinite(kl) else 0.0)
    return out


def ref_token_rewards(scalars, kl, sample_ids, mask, kl_coef) -> list[float]:
    out = [-kl_coef * k for k in kl.tolist()]
    for s, tokens in enumerate(token_lists(sample_ids)):
        in_mask = [t for t in tokens if mask[t] == 1]
        last = in_mask[-1] if in_mask else tokens[-1]
        out[last] += float(scalars[s])
    return out


def ref_returns(token_rewards, sample_ids, gamma) -> list[float]:
    """Every token of the sample counts, masked-out ones included (Miles)."""
    out = [0.0] * len(token_rewards)
    for tokens in token_lists(sample_ids):
        for i, t in enumerate(tokens):
            out[t] = sum(gamma ** (j - i) * float(token_rewards[u])
                         for j, u in enumerate(tokens) if j >= i)
    return out


def ref_whiten(values, mask, eps) -> list[float]:
    kept = [float(v) for v, m in zip(values, mask, strict=True) if m == 1]
    mean = sum(kept) / len(kept)
    var = sum((v - mean) ** 2 for v in kept) / max(len(kept) - 1, 1)  # Bessel, as Miles
    return [(float(v) - mean) / math.sqrt(var + eps) for v in values]


def ref_clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def ref_rho(log_probs, old, sequence_level=False, mask=None, sample_ids=None) -> list[float]:
    """l - old per token, or under GSPO each sample's masked mean of it (not clamped)."""
    rho = [float(l) - float(o) for l, o in zip(log_probs, old, strict=True)]
    if sequence_level:
        for tokens in token_lists(sample_ids):
            count = sum(float(mask[t]) for t in tokens)
            mean = sum(float(mask[t]) * rho[t] for t in tokens) / max(count, 1)
            for t in tokens:
                rho[t] = mean
    return rho


def ref_policy_loss(log_probs, old, advantages, eps_clip, eps_clip_high, eps_clip_c,
                    sequence_level=False, mask=None, sample_ids=None):
    """Per-token (loss, clipped, approx_kl, d loss_t / d rho_t) as Python lists."""
    rho = ref_rho(log_probs, old, sequence_level, mask, sample_ids)
    loss, clipped, dloss = [], [], []
    for r, a in zip(rho, advantages.tolist(), strict=True):
        ratio = math.exp(ref_clamp(r, -20, 20))  # clamped after the GSPO mean
        unclipped_term = -ratio * a
        clipped_term = -ref_clamp(ratio, 1 - eps_clip, 1 + eps_clip_high) * a
        value = max(unclipped_term, clipped_term)
        # The unclipped term carries the gradient d(-exp(rho) a)/d rho = -ratio * a,
        # unless the log-ratio clamp is active.
        grad = -ratio * a if unclipped_term >= clipped_term and abs(r) <= 20 else 0.0
        if eps_clip_c is not None and a < 0 and -eps_clip_c * a < value:
            value, grad = -eps_clip_c * a, 0.0
        loss.append(value)
        clipped.append(1.0 if clipped_term > unclipped_term else 0.0)
        dloss.append(grad)
    return loss, clipped, [-r for r in rho], dloss


def ref_ess(rho, mask, sample_ids) -> list[float]:
    """Per-sample (sum w)^2 / (K * sum w^2) over mask-1 tokens, w = exp(clamp(rho))."""
    out = []
    for tokens in token_lists(sample_ids):
        weights = [math.exp(ref_clamp(rho[t], -20, 20)) for t in tokens if mask[t] == 1]
        count = max(len(weights), 1)
        out.append(sum(weights) ** 2 / (count * max(sum(w * w for w in weights), 1e-8)))
    return out


def ref_kl(d: float, kind: str, ratio: float = 1.0) -> float:
    """The KL estimate of `kind` at d = l - ref, times `ratio` (--use-unbiased-kl)."""
    if kind == "k1":
        return ratio * d
    if kind == "k2":
        return ratio * d * d / 2
    if kind == "k3":
        return ratio * (math.exp(-d) - 1 + d)
    neg_d = ref_clamp(-d, -20, 20)
    return ref_clamp(ratio * (math.exp(neg_d) - 1 - neg_d), -10, 10)


def ref_reduce(values, mask, sample_ids, per_token, denominator) -> float:
    if per_token:
        return sum(float(v) * float(m) for v, m in zip(values, mask, strict=True)) / denominator
    total = 0.0
    for tokens in token_lists(sample_ids):
        count = sum(float(mask[t]) for t in tokens)
        if count:
            total += sum(float(values[t]) * float(mask[t]) for t in tokens) / count
    return total / denominator


def assert_close(actual: torch.Tensor, expected, **kwargs) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected, **kwargs)


# ---------------------------------------------------------------- advantages

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_reference(seed, normalize_std):
    rewards = randn(seed, 4, 5)
    rewards[0] = 1.0  # a group with equal rewards
    rewards[1, 1:] = rewards[1, 0] + 1e-9  # std ~4e-10 <= 1e-8: counts as equal
    rewards[2, 1:] = rewards[2, 0] + 1e-7  # std ~4e-8 > 1e-8: a (tiny) real spread
    expected = ref_grpo(rewards.tolist(), normalize_std, 1e-6)
    assert_close(adv.grpo_advantages(rewards, normalize_std), expected)


def test_grpo_hand_computed():
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = adv.grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=F64))
    a_plus = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # = 0.866024...
    assert_close(a, [[a_plus, -a_plus, -a_plus, a_plus]])
    assert_close(adv.grpo_advantages(torch.tensor([[5.0]])), [[0.0]])  # one sample: no NaN
    assert_close(adv.grpo_advantages(torch.tensor([[2.0, 2.0, 2.0]])), [[0.0, 0.0, 0.0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_equal_rewards_give_exactly_zero_advantage(dtype, normalize_std):
    """Regression: eight float32 rewards of 0.7 got +0.056 each (up to 0.106 for other
    group sizes), the rounding error of the group mean divided by std + 1e-6."""
    for value in (0.7, 0.1, 1 / 3, -2.5, 1e6 + 0.1, 0.0):
        for size in range(1, 17):
            rewards = torch.full((3, size), value, dtype=dtype)
            out = adv.grpo_advantages(rewards, normalize_std)
            assert out.dtype == dtype
            assert (out == 0).all(), (value, size, out)
    # A real spread is not swallowed, even a small one.
    rewards = torch.tensor([[0.7] * 7 + [0.7001]])
    assert (adv.grpo_advantages(rewards) != 0).all()


def test_zero_std_rule_is_shared_by_filter_count_and_advantage():
    """The zero-std filter, rollout/zero_std/count and the zero advantage use one rule
    (Miles' filter: float64 std > 1e-8); drop reasons are named as Miles names them."""
    groups = {"eight 0.7": [0.7] * 8, "all right": [1.0, 1.0, 1.0], "one": [0.3],
              "within 1e-8": [0.3, 0.3 + 1e-9], "spread 1e-7": [0.3, 0.3 + 1e-7],
              "mixed": [0.0, 1.0, 1.0, 0.0], "all wrong": [0.0, 0.0]}
    samples = {name: [Sample(reward=r, response_length=1) for r in rewards]
               for name, rewards in groups.items()}
    args = type("Args", (), {"reward_key": None})()
    expected_zero = {name: ref_zero_std(rewards) for name, rewards in groups.items()}
    assert [name for name, zero in expected_zero.items() if not zero] == ["spread 1e-7",
                                                                         "mixed"]
    for name, rewards in groups.items():
        verdict = check_reward_nonzero_std(args, samples[name])
        assert verdict.keep == (not expected_zero[name]), name
        assert adv.has_zero_std(rewards) == expected_zero[name], name
        advantages = adv.grpo_advantages(torch.tensor([rewards]))
        assert bool((advantages == 0).all()) == expected_zero[name], name
    reasons = {name: check_reward_nonzero_std(args, samples[name]).reason for name in groups}
    assert reasons == {"eight 0.7": "zero_std_0.7", "all right": "zero_std_1.0",
                       "one": "zero_std_0.3", "within 1e-8": "zero_std_0.3",
                       "spread 1e-7": None, "mixed": None, "all wrong": "zero_std_0.0"}
    stats = rollout_stats(list(samples.values()), None, {})
    assert stats["rollout/zero_std/count"] == sum(expected_zero.values()) == 5


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_by_group_id_matches_reference(seed, normalize_std):
    """Groups of unequal size, in interleaved slots, one of equal rewards, one of one."""
    group_ids = [3, 1, 3, 0, 1, 3, 2, 0, 2, 2, 3]
    rewards = randn(seed, len(group_ids))
    rewards[[6, 8, 9]] = 0.7  # group 2: equal rewards
    rewards[[3, 7]] = torch.tensor([0.25, 0.75], dtype=F64)  # group 0: two responses
    ids = torch.tensor(group_ids)
    expected = ref_grpo_by_group_id(rewards.tolist(), group_ids, normalize_std, 1e-6)
    assert_close(adv.grpo_advantages_by_group_id(rewards, ids, normalize_std), expected)
    one_group = adv.grpo_advantages_by_group_id(rewards, torch.zeros_like(ids), normalize_std)
    assert_close(one_group, adv.grpo_advantages(rewards[None], normalize_std)[0])


def test_grpo_by_group_id_handles_unequal_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 5.0])
    out = adv.grpo_advantages_by_group_id(rewards, torch.tensor([7, 7, 7, 9, 9, 4]),
                                          normalize_std=True)
    first = rewards[:3] - rewards[:3].mean()
    torch.testing.assert_close(out[:3], first / (rewards[:3].std() + 1e-6))
    assert out[3:5].tolist() == [0.0, 0.0]  # equal rewards: zero advantage, no NaN
    assert out[5].item() == 0.0             # a group of one
    assert out.dtype == rewards.dtype


@pytest.mark.parametrize("kind", losses.KL_KINDS)
def test_reward_shaping_kl_matches_reference(kind):
    """Finite KL everywhere, masked-out tokens included; a non-finite one counts 0 on a
    masked-out token and stays on a loss token."""
    old, ref = randn(0, 12, scale=2.0), randn(1, 12, scale=2.0)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0] * 2, dtype=F64)
    old[1], ref[3], ref[4] = math.nan, -math.inf, math.inf  # masked out
    old[5] = math.nan  # a loss token
    out = adv.reward_shaping_kl(old, ref, mask, kind)
    assert_close(out, ref_shaping_kl(old, ref, mask, kind), equal_nan=True)
    assert out[1].item() == 0.0  # NaN old log-prob, masked out
    if kind != "low_var_kl":  # which clamps an infinite d to a finite KL
        assert out[[3, 4]].tolist() == [0.0, 0.0]
    assert out[5].isnan()


def test_broadcast_to_tokens():
    sample_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    assert_close(adv.broadcast_to_tokens(torch.tensor([1.0, 2.0, 3.0]), sample_ids),
                 [1.0, 1.0, 2.0, 3.0, 3.0, 3.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_plus_plus_token_rewards_matches_reference(seed):
    sample_ids, mask = random_sample_ids_and_mask(seed)
    scalars, kl = randn(seed + 100, 6), randn(seed + 200, sample_ids.shape[0])
    out = adv.reinforce_plus_plus_token_rewards(scalars, kl, sample_ids, mask, kl_coef=0.1)
    assert_close(out, ref_token_rewards(scalars, kl, sample_ids, mask, 0.1))


def test_reinforce_plus_plus_token_rewards_hand_computed():
    # Sample 0 ends with a masked-out token (reward goes on token 1); sample 1 has no
    # masked-in token (reward goes on its last token, 4).
    sample_ids = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    kl = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = adv.reinforce_plus_plus_token_rewards(torch.tensor([10.0, 20.0]), kl, sample_ids,
                                                mask, kl_coef=0.5)
    assert_close(out, [-0.5, 9.0, -1.5, -2.0, 17.5])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_plus_plus_returns_matches_reference(seed, gamma):
    sample_ids, _ = random_sample_ids_and_mask(seed)
    token_rewards = randn(seed, sample_ids.shape[0])
    out = adv.reinforce_plus_plus_returns(token_rewards, sample_ids, gamma)
    assert_close(out, ref_returns(token_rewards, sample_ids, gamma))


def test_reinforce_plus_plus_returns_hand_computed():
    # sample 0: [1, 2, 3], gamma 0.5 -> [1 + 0.5 * 3.5, 2 + 0.5 * 3, 3]; sample 1: [4]
    sample_ids = torch.tensor([0, 0, 0, 1])
    out = adv.reinforce_plus_plus_returns(torch.tensor([1.0, 2.0, 3.0, 4.0]), sample_ids,
                                          gamma=0.5)
    assert_close(out, [2.75, 3.5, 3.0, 4.0])


def test_reinforce_plus_plus_returns_keep_the_kl_of_masked_out_tokens():
    """As Miles: a masked-out token's -kl_coef * KL still enters the returns of the
    tokens before it. Sample [a, tool, b], mask [1, 0, 1], KL [1, 2, 3], kl_coef 0.5,
    reward 10 at b: returns [-0.5 - 1 + 8.5, -1 + 8.5, 8.5] = [7, 7.5, 8.5]."""
    sample_ids, mask = torch.tensor([0, 0, 0]), torch.tensor([1.0, 0.0, 1.0])
    token_rewards = adv.reinforce_plus_plus_token_rewards(
        torch.tensor([10.0]), torch.tensor([1.0, 2.0, 3.0]), sample_ids, mask, kl_coef=0.5)
    assert_close(adv.reinforce_plus_plus_returns(token_rewards, sample_ids, 1.0),
                 [7.0, 7.5, 8.5])


@pytest.mark.parametrize("seed", SEEDS)
def test_whiten_matches_reference(seed):
    sample_ids, mask = random_sample_ids_and_mask(seed)
    values = randn(seed, sample_ids.shape[0], scale=3.0) + 2.0
    out = adv.whiten(values, mask)
    assert_close(out, ref_whiten(values, mask, 1e-8))
    kept = out[mask == 1]
    assert_close(kept.mean(), 0.0, atol=1e-9, rtol=0)
    assert_close(kept.var(correction=1), 1.0, atol=1e-6, rtol=0)  # Bessel, as Miles


def test_whiten_edge_cases():
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(adv.whiten(values, torch.zeros(2)), values)  # no loss token at all
    assert torch.equal(adv.whiten(values[:0], torch.zeros(0)), values[:0])  # empty batch
    assert_close(adv.whiten(values, torch.tensor([0.0, 1.0])), [-1e4, 0.0])  # one token
    # Masked-out values do not enter the statistics, even when not finite.
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf")], dtype=F64)
    out = adv.whiten(values, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64))
    assert_close(out[[0, 2]], [-1 / math.sqrt(2 + 1e-8), 1 / math.sqrt(2 + 1e-8)])


def reinforce_batch(response_lengths: list[int], seed: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.arange(n) % 3 != 1).float() for n in response_lengths]
    return TrainBatch(
        tokens=[torch.zeros(n + 2, dtype=torch.long) for n in response_lengths],
        response_lengths=response_lengths, loss_masks=masks,
        rewards=torch.rand(len(response_lengths), generator=g),
        old_log_probs=[torch.randn(n, generator=g) - 2 for n in response_lengths],
        ref_log_probs=[torch.randn(n, generator=g) - 2 for n in response_lengths])


@pytest.mark.parametrize("estimator", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_reinforce_plus_plus_on_a_batch_of_empty_responses(estimator):
    """Regression: a batch whose responses are all empty crashed REINFORCE++
    (max() of an empty tensor)."""
    config = GrpoArgs(advantage_estimator=estimator, normalize_advantages=True, kl_coef=0.1,
                      kl_loss_type="k3")
    tokens, scalars = compute_advantages(config, reinforce_batch([0, 0, 0]), [0, 0, 1])
    assert [t.shape for t in tokens] == [torch.Size([0])] * 3 and scalars.shape == (3,)


@pytest.mark.parametrize("estimator", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_reinforce_plus_plus_ignores_non_finite_log_probs_of_masked_out_tokens(estimator):
    """A NaN old log-prob or a -inf reference log-prob on a masked-out token counts as
    KL 0 there; finite masked-out KL still counts (Miles). Compared with the same batch
    where those two tokens hold log-probs whose KL is exactly 0."""
    config = GrpoArgs(advantage_estimator=estimator, normalize_advantages=True, kl_coef=0.1,
                      kl_loss_type="k3")
    batch = reinforce_batch([5, 4, 6])
    assert batch.loss_masks[0][1] == 0 and batch.loss_masks[2][4] == 0
    clean = [lp.clone() for lp in batch.ref_log_probs]
    clean[0][1], clean[2][4] = batch.old_log_probs[0][1], batch.old_log_probs[2][4]
    expected, _ = compute_advantages(config, replace_field(batch, ref_log_probs=clean),
                                     [0, 0, 1])
    batch.old_log_probs[0][1] = float("nan")
    batch.ref_log_probs[2][4] = float("-inf")
    tokens, _ = compute_advantages(config, batch, [0, 0, 1])
    for got, want in zip(tokens, expected, strict=True):
        assert torch.isfinite(got).all()
        assert_close(got, want)


def replace_field(batch: TrainBatch, **changes) -> TrainBatch:
    return TrainBatch(**{**batch.__dict__, **changes})


# ---------------------------------------------------------------- policy loss

def one_token_loss(ratio, advantage, eps_clip=0.2, eps_clip_high=0.2, eps_clip_c=None):
    log_probs = torch.tensor([math.log(ratio)], dtype=F64)
    loss, clipped, _ = losses.policy_loss(log_probs, torch.zeros(1, dtype=F64),
                                          torch.tensor([advantage], dtype=F64),
                                          eps_clip, eps_clip_high, eps_clip_c)
    return loss.item(), clipped.item()


def test_policy_loss_hand_computed():
    approx = pytest.approx
    # ratio 1.5, A = +1: max(-1.5, -1.2) = -1.2, clip wins
    assert one_token_loss(1.5, 1.0) == (approx(-1.2), 1.0)
    # ratio 0.5, A = -1: max(0.5, 0.8) = 0.8, clip wins
    assert one_token_loss(0.5, -1.0) == (approx(0.8), 1.0)
    # ratio 0.5, A = +1: max(-0.5, -0.8) = -0.5, clip loses
    assert one_token_loss(0.5, 1.0) == (approx(-0.5), 0.0)
    # inside the trust region: ratio 1.1, A = 2 -> -2.2
    assert one_token_loss(1.1, 2.0) == (approx(-2.2), 0.0)
    # asymmetric clip: ratio 1.5, A = +1, eps_clip_high 0.28 -> -1.28
    assert one_token_loss(1.5, 1.0, eps_clip_high=0.28) == (approx(-1.28), 1.0)
    # dual clip: ratio 10, A = -1 -> max(10, 1.2) = 10, then min(10, 3) = 3
    assert one_token_loss(10.0, -1.0, eps_clip_c=3.0) == (approx(3.0), 0.0)
    assert one_token_loss(10.0, -1.0) == (approx(10.0), 0.0)
    # dual clip leaves positive advantages alone: ratio 10, A = +1 -> -1.2
    assert one_token_loss(10.0, 1.0, eps_clip_c=3.0) == (approx(-1.2), 1.0)


def policy_inputs(seed: int):
    sample_ids, mask = random_sample_ids_and_mask(seed)
    num_tokens = sample_ids.shape[0]
    old = randn(seed, num_tokens) - 2.0
    log_probs = old + randn(seed + 1, num_tokens, scale=0.5)
    log_probs[0] = old[0] + 2.0  # ratio ~7.4: exercises the dual clip when A < 0
    log_probs[1] = old[1] + 25.0  # beyond the log-ratio clamp of 20
    advantages = randn(seed + 2, num_tokens)
    return log_probs, old, advantages, sample_ids, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sequence_level", [False, True])
@pytest.mark.parametrize("eps_clip_c", [None, 3.0])
def test_policy_loss_matches_reference(seed, sequence_level, eps_clip_c):
    log_probs, old, advantages, sample_ids, mask = policy_inputs(seed)
    log_probs.requires_grad_(True)
    loss, clipped, approx_kl = losses.policy_loss(
        log_probs, old, advantages, 0.2, 0.28, eps_clip_c, sequence_level, mask, sample_ids, 6)
    ref_loss, ref_clipped, ref_kl, ref_dloss = ref_policy_loss(
        log_probs.detach(), old, advantages, 0.2, 0.28, eps_clip_c, sequence_level, mask,
        sample_ids)
    assert_close(loss, ref_loss)
    assert_close(clipped, ref_clipped)
    assert_close(approx_kl, ref_kl)

    # Analytic gradient of sum_t L_t: token level, dL_t/dl_t = dL_t/drho_t; under GSPO
    # rho is the sample's masked mean, so dL/dl_u = m_u / count * sum_{t in sample} dL_t/drho.
    (grad,) = torch.autograd.grad(loss.sum(), log_probs)
    expected = list(ref_dloss)
    if sequence_level:
        for tokens in token_lists(sample_ids):
            count = max(sum(float(mask[t]) for t in tokens), 1)
            total = sum(ref_dloss[t] for t in tokens)
            for t in tokens:
                expected[t] = float(mask[t]) / count * total
    assert_close(grad, expected)


@pytest.mark.parametrize("sequence_level", [False, True])
def test_policy_loss_gradcheck(sequence_level):
    log_probs, old, advantages, sample_ids, mask = policy_inputs(seed=3)

    def loss_of(l):
        return losses.policy_loss(l, old, advantages, 0.2, 0.28, 3.0, sequence_level, mask,
                                  sample_ids, 6)[0]

    assert torch.autograd.gradcheck(loss_of, (log_probs.requires_grad_(True),))


def test_gspo_gives_every_token_of_a_sample_one_ratio():
    log_probs, old, advantages, sample_ids, mask = policy_inputs(seed=0)
    _, _, approx_kl = losses.policy_loss(log_probs, old, advantages, 0.2, 0.2,
                                         sequence_level=True, mask=mask,
                                         sample_ids=sample_ids, num_samples=6)
    for tokens in token_lists(sample_ids):
        assert len(set(approx_kl[tokens].tolist())) == 1
    assert (approx_kl[sample_ids == 1] == 0).all()  # sample 1 is fully masked out (seed 0)


def test_gspo_needs_sample_layout():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="sample_ids"):
        losses.policy_loss(x, x, x, 0.2, 0.2, sequence_level=True)


def test_clamp_log_ratio():
    assert_close(losses.clamp_log_ratio(torch.tensor([50.0, -50.0, 0.5])), [20.0, -20.0, 0.5])


def test_gspo_averages_the_log_ratio_then_clamps():
    """Miles' order: the sequence mean of l - old, then the clamp. One sample, log-ratios
    [30, 0], A = -1: rho = 15 -> L = exp(15) (clamping first would give exp(10)), and
    ppo_kl = -15. A second sample [50, 30]: rho = 40 -> ratio exp(20), ppo_kl = -40."""
    log_probs = torch.tensor([30.0, 0.0, 50.0, 30.0], dtype=F64)
    loss, _, approx_kl = losses.policy_loss(
        log_probs, torch.zeros(4, dtype=F64), torch.full((4,), -1.0, dtype=F64), 0.2, 0.2,
        sequence_level=True, mask=torch.ones(4, dtype=F64), sample_ids=torch.tensor([0, 0, 1, 1]),
        num_samples=2)
    assert_close(loss, [math.exp(15)] * 2 + [math.exp(20)] * 2)
    assert_close(approx_kl, [-15.0, -15.0, -40.0, -40.0])


def test_ppo_kl_is_not_clamped():
    """train/ppo_kl is the mean of old - l as is (Miles); only the ratio is clamped."""
    log_probs = torch.tensor([-60.0, 0.0, -1.0])
    _, _, approx_kl = losses.policy_loss(log_probs, torch.tensor([0.0, -45.0, -1.5]),
                                         torch.ones(3), 0.2, 0.2)
    assert_close(approx_kl, [60.0, -45.0, -0.5])


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_mean_matches_reference(seed):
    sample_ids, mask = random_sample_ids_and_mask(seed)
    values = randn(seed, sample_ids.shape[0])
    expected = [0.0] * len(values)
    for tokens in token_lists(sample_ids):
        count = sum(float(mask[t]) for t in tokens)
        mean = sum(float(values[t] * mask[t]) for t in tokens) / max(count, 1)
        for t in tokens:
            expected[t] = mean
    assert_close(losses.sequence_mean(values, mask, sample_ids, 6), expected)


# ---------------------------------------------------------------- KL, entropy, TIS, SFT

@pytest.mark.parametrize("kind", losses.KL_KINDS)
def test_kl_penalty_matches_reference(kind):
    log_probs, ref_log_probs = randn(0, 50, scale=2.0), randn(1, 50, scale=2.0)
    expected = [ref_kl(float(l - r), kind) for l, r in zip(log_probs, ref_log_probs, strict=True)]
    assert_close(losses.kl_penalty(log_probs, ref_log_probs, kind), expected)


@pytest.mark.parametrize("kind", losses.KL_KINDS)
def test_unbiased_kl_weights_each_estimate_by_the_policy_ratio(kind):
    """--use-unbiased-kl: ratio x estimate, before low_var_kl's clamp (Miles), and the
    gradient flows through the ratio too."""
    log_probs, ref_log_probs = randn(0, 50, scale=2.0), randn(1, 50, scale=2.0)
    old_log_probs = randn(2, 50, scale=0.5) + log_probs
    expected = [ref_kl(float(l - r), kind, math.exp(float(l - o)))
                for l, r, o in zip(log_probs, ref_log_probs, old_log_probs, strict=True)]
    log_probs.requires_grad_(True)
    ratio = (log_probs - old_log_probs).exp()
    got = losses.kl_penalty(log_probs, ref_log_probs, kind, ratio)
    assert_close(got, expected)
    got.sum().backward()
    plain = log_probs.detach().clone().requires_grad_(True)
    (ratio.detach() * losses.kl_penalty(plain, ref_log_probs, kind)).sum().backward()
    unclamped = torch.tensor([abs(v) < 10 for v in expected])
    with_ratio_grad = plain.grad + (got.detach() * unclamped)  # d(ratio)/dl = ratio
    assert_close(log_probs.grad[unclamped], with_ratio_grad[unclamped])


def test_kl_penalty_hand_computed():
    d = torch.tensor([1.0], dtype=F64)
    zero = torch.zeros(1, dtype=F64)
    assert losses.kl_penalty(d, zero, "k1").item() == 1.0
    assert losses.kl_penalty(d, zero, "k2").item() == 0.5
    assert losses.kl_penalty(d, zero, "k3").item() == pytest.approx(math.exp(-1))


def test_low_var_kl_clamps_at_extreme_d():
    d = torch.tensor([-1000.0, -30.0, -2.0, 30.0, 1000.0], dtype=F64)
    out = losses.kl_penalty(d, torch.zeros_like(d), "low_var_kl")
    # -d = 30 and 1000 clamp to 20 -> exp(20) - 21, clamped to 10; -d = -30, -1000 clamp
    # to -20 -> exp(-20) + 19, clamped to 10; d = -2 -> exp(2) - 3 stays.
    assert_close(out, [10.0, 10.0, math.exp(2) - 3, 10.0, 10.0])


def test_kl_penalty_unknown_kind_lists_kinds():
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        losses.kl_penalty(torch.zeros(1), torch.zeros(1), "kl")


def test_tis_weights_are_clipped_and_detached():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    rollout = torch.tensor([0.0, 2.0, -2.0, 30.0], dtype=F64)  # ratio 1, e^-2, e^2, e^-30
    weights, ratio, clipped = losses.tis_weights(old, rollout, clip_low=0.5, clip_high=2.0)
    assert not any(t.requires_grad for t in (weights, ratio, clipped))
    assert_close(weights, [1.0, 0.5, 2.0, 0.5])
    assert_close(ratio, [1.0, math.exp(-2), math.exp(2), math.exp(-30)])  # not clipped
    assert_close(clipped, [0.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_tis_weights_match_reference(seed):
    old, rollout = randn(seed, 30), randn(seed + 1, 30)
    weights, ratio, clipped = losses.tis_weights(old, rollout, clip_low=0.3, clip_high=1.5)
    raw = [math.exp(float(o - r)) for o, r in zip(old, rollout, strict=True)]
    assert_close(ratio, raw)
    assert_close(weights, [ref_clamp(w, 0.3, 1.5) for w in raw])
    assert_close(clipped, [float(not 0.3 <= w <= 1.5) for w in raw])


@pytest.mark.parametrize("seed", SEEDS)
def test_ess_ratio_matches_reference(seed):
    sample_ids, mask = random_sample_ids_and_mask(seed)
    rho = randn(seed, sample_ids.shape[0])
    rho[0] = 30.0  # beyond the clamp
    out = losses.ess_ratio(rho, mask, sample_ids, 6)
    assert_close(out, ref_ess(rho.tolist(), mask, sample_ids))


def test_ess_ratio_hand_computed():
    # Equal weights: 1. Weights [1, e^2]: (1 + e^2)^2 / (2 (1 + e^4)). A sample whose
    # tokens are all masked out: 0 (Miles). A masked-out token does not count.
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    rho = torch.tensor([0.7, 0.7, 0.7, 0.0, 2.0, 1.0, 5.0, -3.0], dtype=F64)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    e2 = math.exp(2)
    assert_close(losses.ess_ratio(rho, mask, sample_ids, 3),
                 [1.0, (1 + e2) ** 2 / (2 * (1 + e2 * e2)), 0.0])
    mask[6] = 1.0
    assert_close(losses.ess_ratio(rho, mask, sample_ids, 3)[2], 1.0)


def test_opsm_drops_negative_advantage_sequences_that_drifted():
    """Sample 0 drifted (mean old - current over its loss tokens 0.5; the masked-out token
    does not count) and has a negative advantage: dropped. Sample 1 drifted as far with a
    positive advantage, sample 2 has a negative advantage and drifted 0.05 <= delta:
    both kept. Sample 3 mixes signs per token (PPO): only its negative token goes."""
    sample_ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    old = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=F64)
    current = torch.tensor([-0.5, -0.5, 9.0, -0.5, -0.5, -0.05, -1.0, -1.0], dtype=F64,
                           requires_grad=True)
    advantages = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0], dtype=F64)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    keep = losses.opsm_keep(current, old, advantages, mask, sample_ids, 4, delta=0.05)
    assert not keep.requires_grad
    assert_close(keep, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])


def test_sft_loss_reduces_to_negative_masked_mean():
    log_probs = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    mask, sample_ids = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    values = losses.sft_loss(log_probs, mask)
    assert_close(losses.reduce_loss(values, mask, sample_ids, 2, True, mask.sum().item()),
                 (1.0 + 3.0 + 4.0) / 3)
    assert_close(losses.reduce_loss(values, mask, sample_ids, 2, False, 2), (1.0 + 3.5) / 2)


# ---------------------------------------------------------------- the objective

def objective_batch(seed: int, num_samples: int = 7) -> tuple[TrainBatch, list[torch.Tensor]]:
    """A float64 batch with every token field, and the current log-probs of each sample.
    Sample 1 is entirely masked out; the others mask out every third token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (num_samples,), generator=g).tolist()

    def per_sample(scale: float, shift: float = 0.0) -> list[torch.Tensor]:
        return [torch.randn(n, generator=g, dtype=F64) * scale + shift for n in lengths]

    masks = [(torch.arange(n) % 3 != 2).to(F64) for n in lengths]
    masks[1].zero_()
    old = per_sample(0.5, -1.5)
    batch = TrainBatch(tokens=[torch.zeros(n + 3, dtype=torch.long) for n in lengths],
                       response_lengths=lengths, loss_masks=masks,
                       rewards=torch.zeros(num_samples, dtype=F64),
                       rollout_log_probs=[o + 0.4 * r for o, r in zip(old, per_sample(1.0),
                                                                        strict=True)],
                       old_log_probs=old, ref_log_probs=per_sample(0.5, -1.5),
                       advantages=per_sample(1.0))
    current = [o + 0.4 * r for o, r in zip(old, per_sample(1.0), strict=True)]
    current[0][0] = old[0][0] + 25.0  # beyond the log-ratio clamp
    return batch, current


def objective_config(per_token: bool, gspo: bool, use_rollout_logprobs: bool = False,
                     kl_loss_type: str = "low_var_kl", use_opsm: bool = False,
                     use_unbiased_kl: bool = False) -> GrpoArgs:
    return GrpoArgs(advantage_estimator="gspo" if gspo else "grpo", use_kl_loss=True,
                    kl_loss_coef=0.1, kl_loss_type=kl_loss_type, entropy_coef=0.01,
                    eps_clip_high=0.28, eps_clip_c=3.0, use_tis=True, tis_clip_low=0.5,
                    tis_clip=1.5, calculate_per_token_loss=per_token,
                    use_rollout_logprobs=use_rollout_logprobs, use_opsm=use_opsm,
                    opsm_delta=0.01, use_unbiased_kl=use_unbiased_kl)


def run_objective(config: GrpoArgs, batch: TrainBatch, current: list[torch.Tensor],
                  bounds: list[tuple[int, int]]) -> tuple[dict, torch.Tensor]:
    """Metrics summed over the micro-batches [start, end) (each reduced with the global
    denominator, as the trainer does), and the gradient of the loss in `current`."""
    leaves = [c.clone().requires_grad_(True) for c in current]
    denominator = batch.num_loss_tokens() if config.calculate_per_token_loss else len(batch)
    totals: dict = {}
    for start, end in bounds:
        micro = pack(batch, list(range(start, end)), "cpu")
        log_probs = torch.cat(leaves[start:end])
        entropy = log_probs.detach().neg().exp()  # any per-token values
        inputs = LossInputs(log_probs, entropy, micro,
                            make_reducer(micro, config.calculate_per_token_loss,
                                         max(denominator, 1)))
        loss, metrics = policy_objective(config, inputs)
        loss.backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value
    return totals, torch.cat([leaf.grad for leaf in leaves])


def ref_objective_metrics(config: GrpoArgs, batch: TrainBatch, current) -> dict[str, float]:
    """The metrics of policy_objective, one token at a time in Python floats (Miles'
    definitions, docs/algorithm.md)."""
    sample_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(batch.response_lengths)])
    mask, adv_ = torch.cat(batch.loss_masks), torch.cat(batch.advantages)
    l, ref = torch.cat(current).tolist(), torch.cat(batch.ref_log_probs).tolist()
    rollout = torch.cat(batch.rollout_log_probs).tolist()
    old = rollout if config.use_rollout_logprobs else torch.cat(batch.old_log_probs).tolist()
    trainer = l if config.use_rollout_logprobs else old
    gspo = config.advantage_estimator == "gspo"
    pg, clipped, approx_kl, _ = ref_policy_loss(l, old, adv_, config.eps_clip,
                                                config.eps_clip_high, config.eps_clip_c,
                                                gspo, mask, sample_ids)
    ratio = [math.exp(t - r) for t, r in zip(trainer, rollout, strict=True)]
    weights = [ref_clamp(w, config.tis_clip_low, config.tis_clip) for w in ratio]
    per_token = config.calculate_per_token_loss
    denominator = float(mask.sum()) if per_token else len(batch)

    def mean(values) -> float:
        return ref_reduce(values, mask, sample_ids, per_token, denominator)

    ess = ref_ess([-k for k in approx_kl], mask, sample_ids)
    counts = [float(m.sum()) for m in batch.loss_masks]
    # Off-policy sequence masking: a sample's drift is its mean of old - current over its
    # loss tokens; a token with a negative advantage in a sample that drifted too far
    # keeps no policy loss.
    drift = [sum((old[t] - l[t]) * float(mask[t]) for t in tokens) / max(counts[i], 1.0)
             for i, tokens in enumerate(token_lists(sample_ids))]
    keep = [0.0 if config.use_opsm and float(adv_[t]) < 0
            and drift[int(sample_ids[t])] > config.opsm_delta else 1.0
            for t in range(len(l))]
    metrics = {
        "pg_loss": mean([p * w * k for p, w, k in zip(pg, weights, keep, strict=True)]),
        "pg_clipfrac": mean(clipped), "ppo_kl": mean(approx_kl),
        "entropy_loss": mean([math.exp(-x) for x in l]),
        "kl_loss": mean([ref_kl(x - r, config.kl_loss_type,
                                math.exp(x - o) if config.use_unbiased_kl else 1.0)
                         for x, r, o in zip(l, ref, old, strict=True)]),
        "ess_ratio": sum(e * (c if per_token else 1.0) for e, c in zip(ess, counts, strict=True))
        / denominator,
        "train_rollout_logprob_abs_diff": mean([abs(t - r) for t, r in zip(trainer, rollout,
                                                                           strict=True)]),
        "train_rollout_kl": mean([ref_kl(r - t, "low_var_kl") for t, r in zip(trainer, rollout,
                                                                              strict=True)]),
        "tis": mean(ratio), "tis_abs": mean([abs(w - 1) for w in ratio]),
        "tis_clipfrac": mean([float(w != c) for w, c in zip(ratio, weights, strict=True)]),
        "ois": mean([math.exp(-k) for k in approx_kl]),
    }
    if config.use_opsm:
        metrics["opsm_clipfrac"] = mean([1.0 - k for k in keep])
    metrics["loss"] = (metrics["pg_loss"] - config.entropy_coef * metrics["entropy_loss"]
                       + config.kl_loss_coef * metrics["kl_loss"])
    return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("gspo", [False, True])
@pytest.mark.parametrize("use_rollout_logprobs", [False, True])
@pytest.mark.parametrize("use_opsm", [False, True])
def test_policy_objective_metrics_match_reference(seed, per_token, gspo, use_rollout_logprobs,
                                                  use_opsm):
    """Every metric of the objective, TIS, off-policy sequence masking and Miles'
    mismatch metrics included, against a float64 loop; with --use-rollout-logprobs the
    old log-probs are the engine's and the trainer side of the mismatch metrics is the
    current forward."""
    config = objective_config(per_token, gspo, use_rollout_logprobs, use_opsm=use_opsm)
    batch, current = objective_batch(seed)
    if use_rollout_logprobs:
        batch.old_log_probs = batch.rollout_log_probs
    metrics, _ = run_objective(config, batch, current, [(0, len(batch))])
    expected = ref_objective_metrics(config, batch, current)
    assert sorted(metrics) == sorted(expected)
    for name, value in expected.items():
        assert_close(metrics[name], value, msg=name)
    if use_opsm and seed == 0:  # (seed 0 drops some tokens, not all)
        assert 0 < metrics["opsm_clipfrac"] < 1


@pytest.mark.parametrize("kind", losses.KL_KINDS)
@pytest.mark.parametrize("gspo", [False, True])
def test_unbiased_kl_loss_matches_reference(kind, gspo):
    """--use-unbiased-kl in the objective: each token's KL estimate times exp(l - old)."""
    config = objective_config(False, gspo, kl_loss_type=kind, use_unbiased_kl=True)
    batch, current = objective_batch(1)
    metrics, _ = run_objective(config, batch, current, [(0, len(batch))])
    expected = ref_objective_metrics(config, batch, current)
    assert_close(metrics["kl_loss"], expected["kl_loss"])
    plain, _ = run_objective(replace(config, use_unbiased_kl=False), batch, current,
                             [(0, len(batch))])
    assert abs(float(plain["kl_loss"]) - float(metrics["kl_loss"])) > 1e-4


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("gspo", [False, True])
def test_policy_objective_does_not_depend_on_the_split(per_token, gspo):
    """Every metric (ess_ratio and the TIS metrics included) and the gradient are the
    same whatever the micro-batch split, each reduced with the global denominator."""
    config = objective_config(per_token, gspo, use_opsm=True)
    batch, current = objective_batch(seed=3)
    whole, whole_grad = run_objective(config, batch, current, [(0, 7)])
    for bounds in SPLITS:
        split, split_grad = run_objective(config, batch, current, bounds)
        for name, value in whole.items():
            assert_close(split[name], value, msg=name)
        assert_close(split_grad, whole_grad)


@pytest.mark.parametrize("kl_loss_type", losses.KL_KINDS)
@pytest.mark.parametrize("gspo", [False, True])
def test_non_finite_values_on_masked_out_tokens_change_nothing(kl_loss_type, gspo):
    """Regression: a NaN old log-prob or a -inf reference log-prob on a masked-out token
    made the loss (or its gradient) NaN through 0 * NaN. Loss, metrics and gradient
    must equal those of the same batch with finite values there."""
    config = objective_config(per_token=False, gspo=gspo, kl_loss_type=kl_loss_type)
    batch, current = objective_batch(seed=4)
    clean, clean_grad = run_objective(config, batch, current, [(0, 7)])
    for field, value in (("old_log_probs", "nan"), ("ref_log_probs", "-inf"),
                         ("rollout_log_probs", "nan"), ("advantages", "nan")):
        for i, mask in enumerate(batch.loss_masks):
            getattr(batch, field)[i][mask == 0] = float(value)
    metrics, grad = run_objective(config, batch, current, [(0, 7)])
    assert all(torch.isfinite(v) for v in metrics.values()) and torch.isfinite(grad).all()
    for name, value in clean.items():
        assert_close(metrics[name], value, msg=name)
    assert_close(grad, clean_grad)


# ---------------------------------------------------------------- reductions

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("per_token", [True, False])
def test_reduce_loss_matches_reference(seed, per_token):
    sample_ids, mask = random_sample_ids_and_mask(seed)
    values = randn(seed, sample_ids.shape[0])
    out = losses.reduce_loss(values, mask, sample_ids, 6, per_token, global_denominator=9.0)
    assert_close(out, ref_reduce(values, mask, sample_ids, per_token, 9.0))
    assert_close(losses.masked_sum(values, mask), ref_reduce(values, mask, sample_ids, True, 1))
    assert_close(losses.per_sample_mean_sum(values, mask, sample_ids, 6),
                 ref_reduce(values, mask, sample_ids, False, 1))


SPLITS = [  # sample slots [start, end) of each micro-batch, for a global batch of 7
    [(0, 3), (3, 7)],
    [(0, 1), (1, 3), (3, 6), (6, 7)],
    [(0, 6), (6, 7)],
]


def total_loss(log_probs, old, advantages, ref_log_probs, sample_ids, mask, bounds,
               per_token, sequence_level):
    """Sum over micro-batches of (policy loss + 0.1 * k3 KL), each reduced with reduce_loss."""
    num_samples = int(sample_ids.max()) + 1
    denominator = mask.sum().item() if per_token else num_samples
    total = torch.zeros((), dtype=F64)
    for start, end in bounds:
        tokens = (sample_ids >= start) & (sample_ids < end)
        ids = sample_ids[tokens] - start  # slots local to the micro-batch
        pg, _, _ = losses.policy_loss(log_probs[tokens], old[tokens], advantages[tokens],
                                      0.2, 0.28, 3.0, sequence_level, mask[tokens], ids,
                                      end - start)
        values = pg + 0.1 * losses.kl_penalty(log_probs[tokens], ref_log_probs[tokens], "k3")
        total = total + losses.reduce_loss(values, mask[tokens], ids, end - start, per_token,
                                           denominator)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("sequence_level", [False, True])
def test_reduced_loss_does_not_depend_on_the_split(seed, per_token, sequence_level):
    """Guards against averaging per micro-batch, which weights samples by how the global
    batch happened to be split into micro-batches and ranks."""
    sample_ids, mask = random_sample_ids_and_mask(seed, num_samples=7)
    num_tokens = sample_ids.shape[0]
    old, advantages, ref_log_probs = (randn(seed + k, num_tokens) for k in range(3))
    log_probs = (old + randn(seed + 3, num_tokens, scale=0.4)).requires_grad_(True)
    args = (log_probs, old, advantages, ref_log_probs, sample_ids, mask)

    whole = total_loss(*args, [(0, 7)], per_token, sequence_level)
    (whole_grad,) = torch.autograd.grad(whole, log_probs)
    ref_pg = ref_policy_loss(log_probs.detach(), old, advantages, 0.2, 0.28, 3.0,
                             sequence_level, mask, sample_ids)[0]
    ref_values = [pg + 0.1 * ref_kl(float(l - r), "k3")
                  for pg, l, r in zip(ref_pg, log_probs.detach(), ref_log_probs, strict=True)]
    denominator = mask.sum().item() if per_token else 7
    assert_close(whole, ref_reduce(ref_values, mask, sample_ids, per_token, denominator))
    for bounds in SPLITS:
        split = total_loss(*args, bounds, per_token, sequence_level)
        (split_grad,) = torch.autograd.grad(split, log_probs)
        assert_close(split, whole.detach())
        assert_close(split_grad, whole_grad)


def test_multi_turn_metadata_is_averaged_over_the_samples_that_have_it():
    """rollout/num_turns, rollout/tool_call_parse_errors, rollout/retokenize_mismatch_tokens:
    means over the samples whose metadata holds them (agents and multi-turn), absent else."""
    def sample(**metadata) -> Sample:
        return Sample(tokens=[1, 2], response_length=1, reward=1.0, metadata=metadata)
    groups = [[sample(num_turns=2, retokenize_mismatch_tokens=4),
               sample(num_turns=3, retokenize_mismatch_tokens=0, tool_call_parse_errors=1)]]
    stats = rollout_stats(groups, None, {})
    assert (stats["rollout/num_turns"], stats["rollout/retokenize_mismatch_tokens"],
            stats["rollout/tool_call_parse_errors"]) == (2.5, 2, 1)
    assert "rollout/num_turns" not in rollout_stats([[sample(), sample()]], None, {})


def test_a_samples_metadata_raw_reward_is_what_raw_reward_logs():
    """Miles' override: a hook may log its own score of a sample (metadata["raw_reward"])
    beside the reward that trains; the zero-std count stays the trained rewards'."""
    groups = [[Sample(reward=1.0, metadata={"raw_reward": 0}), Sample(reward=1.0)],
              [Sample(reward=0.0, metadata={"raw_reward": 1}), Sample(reward=1.0)]]
    stats = rollout_stats(groups, None, {})
    assert stats["rollout/raw_reward"] == 0.75 and stats["rollout/zero_std/count"] == 1
    assert reward_stats(groups, [0.5, 0.5, 0.5, 0.5]) == {
        "rollout/raw_reward": 0.5, "rollout/zero_std/count": 2}
