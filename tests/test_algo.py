"""Tests of furlong.algo: each function against a slow per-element reference written
here with Python floats and loops, plus hand-computed values, gradients, and the
invariance of the reduced loss to how a global batch is split into micro-batches."""
from __future__ import annotations

import math

import pytest
import torch

from furlong.algo import advantages as adv
from furlong.algo import losses

SEEDS = range(5)
F64 = torch.float64


# ---------------------------------------------------------------- random inputs

def random_batch(seed: int, num_samples: int = 6, max_length: int = 7):
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

def ref_grpo(rewards: list[list[float]], normalize_std: bool, eps: float) -> list[list[float]]:
    out = []
    for group in rewards:
        n = len(group)
        mean = sum(group) / n
        centered = [r - mean for r in group]
        if normalize_std and n > 1:
            std = math.sqrt(sum(c * c for c in centered) / (n - 1))
            centered = [c / (std + eps) for c in centered]
        out.append(centered)
    return out


def ref_token_rewards(scalars, kl, sample_ids, mask, kl_coef) -> list[float]:
    out = [-kl_coef * k for k in kl.tolist()]
    for s, tokens in enumerate(token_lists(sample_ids)):
        in_mask = [t for t in tokens if mask[t] == 1]
        last = in_mask[-1] if in_mask else tokens[-1]
        out[last] += float(scalars[s])
    return out


def ref_returns(token_rewards, sample_ids, mask, gamma) -> list[float]:
    out = [0.0] * len(token_rewards)
    for tokens in token_lists(sample_ids):
        for i, t in enumerate(tokens):
            out[t] = sum(gamma ** (j - i) * float(mask[u]) * float(token_rewards[u])
                         for j, u in enumerate(tokens) if j >= i)
    return out


def ref_whiten(values, mask, eps) -> list[float]:
    kept = [float(v) for v, m in zip(values, mask, strict=True) if m == 1]
    mean = sum(kept) / len(kept)
    var = sum((v - mean) ** 2 for v in kept) / len(kept)
    return [(float(v) - mean) / math.sqrt(var + eps) for v in values]


def ref_clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def ref_policy_loss(log_probs, old, advantages, eps_clip, eps_clip_high, eps_clip_c,
                    sequence_level=False, mask=None, sample_ids=None):
    """Per-token (loss, clipped, approx_kl, d loss_t / d rho_t) as Python lists."""
    rho = [ref_clamp(float(l) - float(o), -20, 20) for l, o in zip(log_probs, old, strict=True)]
    if sequence_level:
        for tokens in token_lists(sample_ids):
            count = sum(float(mask[t]) for t in tokens)
            mean = sum(float(mask[t]) * rho[t] for t in tokens) / max(count, 1)
            for t in tokens:
                rho[t] = mean
    loss, clipped, dloss = [], [], []
    for r, a in zip(rho, advantages.tolist(), strict=True):
        ratio = math.exp(r)
        unclipped_term = -ratio * a
        clipped_term = -ref_clamp(ratio, 1 - eps_clip, 1 + eps_clip_high) * a
        value = max(unclipped_term, clipped_term)
        # The unclipped term carries the gradient d(-exp(rho) a)/d rho = -ratio * a.
        grad = -ratio * a if unclipped_term >= clipped_term else 0.0
        if eps_clip_c is not None and a < 0 and -eps_clip_c * a < value:
            value, grad = -eps_clip_c * a, 0.0
        loss.append(value)
        clipped.append(1.0 if clipped_term > unclipped_term else 0.0)
        dloss.append(grad)
    return loss, clipped, [-r for r in rho], dloss


def ref_kl(d: float, kind: str) -> float:
    if kind == "k1":
        return d
    if kind == "k2":
        return d * d / 2
    if kind == "k3":
        return math.exp(-d) - 1 + d
    neg_d = ref_clamp(-d, -20, 20)
    return ref_clamp(math.exp(neg_d) - 1 - neg_d, -10, 10)


def ref_entropy(row: list[float]) -> float:
    top = max(row)
    weights = [math.exp(z - top) for z in row]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


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
    expected = ref_grpo(rewards.tolist(), normalize_std, 1e-6)
    assert_close(adv.grpo_advantages(rewards, normalize_std), expected)
    assert adv.gspo_advantages is adv.grpo_advantages


def test_grpo_hand_computed():
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = adv.grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=F64))
    a_plus = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # = 0.866024...
    assert_close(a, [[a_plus, -a_plus, -a_plus, a_plus]])
    assert_close(adv.grpo_advantages(torch.tensor([[5.0]])), [[0.0]])  # one sample: no NaN
    assert_close(adv.grpo_advantages(torch.tensor([[2.0, 2.0, 2.0]])), [[0.0, 0.0, 0.0]])


def test_broadcast_to_tokens():
    sample_ids = torch.tensor([0, 0, 1, 2, 2, 2])
    assert_close(adv.broadcast_to_tokens(torch.tensor([1.0, 2.0, 3.0]), sample_ids),
                 [1.0, 1.0, 2.0, 3.0, 3.0, 3.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce_plus_plus_token_rewards_matches_reference(seed):
    sample_ids, mask = random_batch(seed)
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
    sample_ids, mask = random_batch(seed)
    token_rewards = randn(seed, sample_ids.shape[0])
    out = adv.reinforce_plus_plus_returns(token_rewards, sample_ids, mask, gamma)
    assert_close(out, ref_returns(token_rewards, sample_ids, mask, gamma))


def test_reinforce_plus_plus_returns_hand_computed():
    # sample 0: [1, 2, 3], gamma 0.5 -> [1 + 0.5 * 3.5, 2 + 0.5 * 3, 3]; sample 1: [4]
    sample_ids = torch.tensor([0, 0, 0, 1])
    out = adv.reinforce_plus_plus_returns(torch.tensor([1.0, 2.0, 3.0, 4.0]), sample_ids,
                                          torch.ones(4), gamma=0.5)
    assert_close(out, [2.75, 3.5, 3.0, 4.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_whiten_matches_reference(seed):
    sample_ids, mask = random_batch(seed)
    values = randn(seed, sample_ids.shape[0], scale=3.0) + 2.0
    out = adv.whiten(values, mask)
    assert_close(out, ref_whiten(values, mask, 1e-8))
    kept = out[mask == 1]
    assert_close(kept.mean(), 0.0, atol=1e-9, rtol=0)
    assert_close(kept.var(correction=0), 1.0, atol=1e-6, rtol=0)


def test_whiten_empty_mask_gives_no_nan():
    assert torch.isfinite(adv.whiten(torch.tensor([1.0, 2.0]), torch.zeros(2))).all()


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
    sample_ids, mask = random_batch(seed)
    num_tokens = sample_ids.shape[0]
    old = randn(seed, num_tokens) - 2.0
    log_probs = old + randn(seed + 1, num_tokens, scale=0.5)
    log_probs[0] = old[0] + 2.0  # ratio ~7.4: exercises the dual clip when A < 0
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


def test_log_ratio_clamps():
    out = losses.log_ratio(torch.tensor([0.0, -50.0, 1.0]), torch.tensor([-50.0, 0.0, 0.5]))
    assert_close(out, [20.0, -20.0, 0.5])


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_mean_matches_reference(seed):
    sample_ids, mask = random_batch(seed)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_reference(dtype):
    logits = randn(0, 4, 11, scale=3.0).to(dtype)
    out = losses.entropy_from_logits(logits)
    assert out.dtype == torch.float32
    assert_close(out, [ref_entropy(row) for row in logits.double().tolist()])


def test_entropy_uniform_is_log_vocab():
    assert_close(losses.entropy_from_logits(torch.zeros(2, 7)), [math.log(7)] * 2)


def test_tis_weights_are_clipped_and_detached():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    rollout = torch.tensor([0.0, 2.0, -2.0, 30.0], dtype=F64)  # ratio 1, e^-2, e^2, e^-30
    weights, clipped = losses.tis_weights(old, rollout, clip_low=0.5, clip_high=2.0)
    assert not weights.requires_grad and not clipped.requires_grad
    assert_close(weights, [1.0, 0.5, 2.0, 0.5])
    assert_close(clipped, [0.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("seed", SEEDS)
def test_tis_weights_match_reference(seed):
    old, rollout = randn(seed, 30), randn(seed + 1, 30)
    weights, clipped = losses.tis_weights(old, rollout, clip_low=0.3, clip_high=1.5)
    raw = [math.exp(float(o - r)) for o, r in zip(old, rollout, strict=True)]
    assert_close(weights, [ref_clamp(w, 0.3, 1.5) for w in raw])
    assert_close(clipped, [float(not 0.3 <= w <= 1.5) for w in raw])


def test_sft_loss_reduces_to_negative_masked_mean():
    log_probs = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    mask, sample_ids = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    values = losses.sft_loss(log_probs, mask)
    assert_close(losses.reduce_loss(values, mask, sample_ids, 2, True, mask.sum().item()),
                 (1.0 + 3.0 + 4.0) / 3)
    assert_close(losses.reduce_loss(values, mask, sample_ids, 2, False, 2), (1.0 + 3.5) / 2)


# ---------------------------------------------------------------- reductions

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("per_token", [True, False])
def test_reduce_loss_matches_reference(seed, per_token):
    sample_ids, mask = random_batch(seed)
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
    sample_ids, mask = random_batch(seed, num_samples=7)
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
