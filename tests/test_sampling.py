"""furlong.engine.sampling: hashed Gumbel-max sampling as pure tensor functions.

The reference distribution of every statistical test is computed here, independently
of `filter_top_k_top_p`: softmax(logits / T), the kept set being the top-k tokens and,
on the full (not top-k renormalised) distribution, the tokens whose strictly-better mass
is <= top_p (SGLang's rule), renormalised over the kept set.
"""
from __future__ import annotations

import math

import pytest
import torch

from furlong.engine.sampling import filter_top_k_top_p, hash_uniform, sample_tokens

# V = 8, deliberately not sorted, so a bug that keeps the first k ids instead of the
# k largest logits shows. No cumulative mass below lies within 0.02 of a top_p used here.
LOGITS = torch.tensor([0.5, 2.0, -1.0, 1.0, -3.0, 1.5, 0.0, -0.5])
NUM_ROWS = 20_000


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float
                    ) -> list[float]:
    """softmax(logits / T) restricted to the top-k / top-p set, renormalised (pure Python)."""
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    weights = [math.exp(x - top) for x in scaled]
    total = sum(weights)
    probs = [w / total for w in weights]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass_before = set(), 0.0
    for rank, token in enumerate(order):
        within_k = top_k <= 0 or rank < top_k
        if within_k and (rank == 0 or mass_before <= top_p):
            kept.add(token)
        mass_before += probs[token]
    kept_mass = sum(probs[i] for i in kept)
    return [probs[i] / kept_mass if i in kept else 0.0 for i in range(len(probs))]


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         num_rows: int = NUM_ROWS, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample_tokens call: num_rows copies of `logits`, seeds 0..num_rows-1."""
    batch = logits[None].repeat(num_rows, 1)
    return sample_tokens(batch, torch.full((num_rows,), temperature),
                         torch.full((num_rows,), top_k), torch.full((num_rows,), top_p),
                         torch.arange(num_rows), torch.full((num_rows,), step))


def assert_matches(tokens: torch.Tensor, expected: list[float]) -> None:
    """Frequencies within 5 standard errors of `expected`; excluded tokens never drawn."""
    counts = torch.bincount(tokens, minlength=len(expected)).tolist()
    num = len(tokens)
    for token, (count, p) in enumerate(zip(counts, expected, strict=True)):
        if p == 0.0:
            assert count == 0, f"token {token} is outside the kept set but was drawn {count} times"
            continue
        tolerance = 5 * math.sqrt(p * (1 - p) / num) + 1e-9
        assert abs(count / num - p) <= tolerance, (
            f"token {token}: frequency {count / num:.4f}, expected {p:.4f} +- {tolerance:.4f}")


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, -1, 1.0),    # plain softmax
    (0.7, -1, 1.0),    # sharper
    (1.5, 3, 1.0),     # top-k only
    (1.0, -1, 0.6),    # top-p only
    (0.8, 5, 0.75),    # both
    (1.0, 3, 0.7),     # both; renormalising after top-k first would also drop the 3rd token
    (2.0, 2, 0.95),    # top-k is the binding one
])
def test_frequencies_follow_the_restricted_softmax(temperature, top_k, top_p):
    tokens, _ = draw(LOGITS, temperature, top_k, top_p)
    assert_matches(tokens, reference_probs(LOGITS.tolist(), temperature, top_k, top_p))


def test_per_row_parameters_apply_to_their_own_rows():
    """Rows with different (T, top_k, top_p) in one batch each follow their own distribution."""
    settings = [(0.5, 2, 1.0), (1.0, -1, 1.0), (1.3, -1, 0.5)]
    per_setting = 8_000
    rows = [s for s in settings for _ in range(per_setting)]
    num = len(rows)
    tokens, _ = sample_tokens(LOGITS[None].repeat(num, 1),
                              torch.tensor([t for t, _, _ in rows]),
                              torch.tensor([k for _, k, _ in rows]),
                              torch.tensor([p for _, _, p in rows]),
                              torch.arange(num), torch.zeros(num, dtype=torch.long))
    for i, (temperature, top_k, top_p) in enumerate(settings):
        assert_matches(tokens[i * per_setting:(i + 1) * per_setting],
                       reference_probs(LOGITS.tolist(), temperature, top_k, top_p))


def test_top_p_keeps_the_most_likely_token_even_when_it_alone_exceeds_top_p():
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])
    tokens, _ = draw(logits, 1.0, -1, 0.1, num_rows=2_000)
    assert set(tokens.tolist()) == {0}


def test_filter_top_k_top_p_masks_exactly_the_dropped_tokens():
    logits = torch.stack([LOGITS, LOGITS, LOGITS])
    filtered = filter_top_k_top_p(logits, torch.tensor([3, -1, -1]), torch.tensor([1.0, 0.6, 1.0]))
    for row, (top_k, top_p) in enumerate([(3, 1.0), (-1, 0.6), (-1, 1.0)]):
        kept = [p > 0 for p in reference_probs(LOGITS.tolist(), 1.0, top_k, top_p)]
        assert torch.isfinite(filtered[row]).tolist() == kept
        assert torch.equal(filtered[row][torch.tensor(kept)], LOGITS[torch.tensor(kept)])


def test_temperature_zero_is_argmax_with_the_log_prob_at_temperature_one():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=generator) * 3
    tokens, log_probs = sample_tokens(logits, torch.zeros(64), torch.full((64,), 5),
                                      torch.full((64,), 0.5), torch.arange(64) * 7919,
                                      torch.arange(64))
    assert torch.equal(tokens, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(log_probs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, -1, 1.0), (0.7, 3, 0.9), (1.6, 2, 1.0)])
def test_log_prob_is_over_the_full_vocabulary_at_the_temperature(temperature, top_k, top_p):
    """The trainer recomputes log_softmax(logits / T) over all tokens, not over the kept set."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(256, 30, generator=generator) * 2
    tokens, log_probs = sample_tokens(logits, torch.full((256,), temperature),
                                      torch.full((256,), top_k), torch.full((256,), top_p),
                                      torch.arange(256), torch.zeros(256, dtype=torch.long))
    expected = (logits.double() / temperature).log_softmax(-1).gather(-1, tokens[:, None])
    torch.testing.assert_close(log_probs.double(), expected.squeeze(-1), rtol=0, atol=1e-5)
    assert log_probs.dtype == torch.float32


def test_a_row_depends_only_on_its_logits_seed_and_step():
    """Batch neighbours and batch order never change a row's token (continuous batching)."""
    generator = torch.Generator().manual_seed(2)
    num, vocab = 64, 40
    logits = torch.randn(num, vocab, generator=generator)
    temperature = torch.rand(num, generator=generator) + 0.5
    top_k = torch.randint(-1, 10, (num,), generator=generator)
    top_p = torch.rand(num, generator=generator) * 0.5 + 0.5
    seeds = torch.randint(0, 2**62, (num,), generator=generator)
    steps = torch.randint(0, 1000, (num,), generator=generator)
    args = (logits, temperature, top_k, top_p, seeds, steps)
    tokens, log_probs = sample_tokens(*args)

    order = torch.randperm(num, generator=generator)
    shuffled_tokens, shuffled_log_probs = sample_tokens(*(a[order] for a in args))
    assert torch.equal(shuffled_tokens, tokens[order])
    assert torch.equal(shuffled_log_probs, log_probs[order])

    for row in (0, 17, 63):  # alone, and next to unrelated rows
        alone, _ = sample_tokens(*(a[row:row + 1] for a in args))
        assert alone.item() == tokens[row].item()
        others = torch.randn(5, vocab, generator=generator)
        mixed = (torch.cat([others, logits[row:row + 1]]),
                 torch.cat([torch.ones(5), temperature[row:row + 1]]),
                 torch.cat([torch.full((5,), -1), top_k[row:row + 1]]),
                 torch.cat([torch.ones(5), top_p[row:row + 1]]),
                 torch.cat([torch.arange(5), seeds[row:row + 1]]),
                 torch.cat([torch.arange(5), steps[row:row + 1]]))
        assert sample_tokens(*mixed)[0][-1].item() == tokens[row].item()


def test_noise_differs_across_steps_and_seeds():
    vocab = 1000
    base = hash_uniform(torch.tensor([12345]), torch.tensor([0]), vocab)
    variants = {
        "next step": hash_uniform(torch.tensor([12345]), torch.tensor([1]), vocab),
        "next seed": hash_uniform(torch.tensor([12346]), torch.tensor([0]), vocab),
        # sample_seed produces 63-bit seeds: the high 32 bits must matter too
        "seed + 2**32": hash_uniform(torch.tensor([12345 + 2**32]), torch.tensor([0]), vocab),
    }
    for name, noise in variants.items():
        same = (noise == base).float().mean().item()
        assert same < 0.01, f"{name}: {same:.1%} of the noise values equal the base row's"
        correlation = torch.corrcoef(torch.stack([base[0], noise[0]]))[0, 1].abs().item()
        assert correlation < 0.15, f"{name}: noise correlated with the base row ({correlation:.3f})"
    # Same (seed, step) -> bit-identical noise.
    assert torch.equal(hash_uniform(torch.tensor([12345]), torch.tensor([0]), vocab), base)
    # Different seeds give different tokens from identical logits, sometimes.
    tokens, _ = draw(torch.zeros(16), 1.0, -1, 1.0, num_rows=200)
    assert len(set(tokens.tolist())) == 16
    per_step = [draw(torch.zeros(16), 1.0, -1, 1.0, num_rows=1, step=s)[0].item() for s in range(64)]
    assert len(set(per_step)) > 8


def test_hash_uniform_is_strictly_inside_the_unit_interval():
    """Regression: the 24-bit mantissa trick rounded (2**24 - 0.5) / 2**24 up to exactly 1.0 in
    float32 (seed 11608, step 0, token 1133 hit it), giving that token infinite Gumbel noise."""
    seeds = torch.arange(11_000, 12_000)  # includes the old failure, 1.1M values
    u = hash_uniform(seeds, torch.zeros_like(seeds), 1_134)
    assert u.dtype == torch.float32
    assert u.min().item() > 0 and u.max().item() < 1
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_a_filtered_token_is_never_drawn_whatever_its_noise():
    """Regression: where u == 1.0 the noise was +inf, so a token outside top-k (even one with
    logit -inf after filtering, inf + -inf = nan, which argmax picks) won the draw."""
    vocab = 1_134
    logits = torch.zeros(1, vocab)
    logits[0, 7] = 10.0
    tokens, _ = sample_tokens(logits, torch.ones(1), torch.ones(1, dtype=torch.long),
                              torch.ones(1), torch.tensor([11608]), torch.tensor([0]))
    assert tokens.item() == 7


def test_hash_uniform_is_roughly_uniform():
    seeds = torch.arange(4_000)
    u = hash_uniform(seeds, torch.full_like(seeds, 3), 64).flatten().double()  # 256k values
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0, max=1) / len(u)
    assert (counts - 0.05).abs().max().item() < 0.003  # ~ 7 standard errors of one bin
    # Neighbouring tokens of one row are not correlated.
    grid = u.view(4_000, 64)
    correlation = torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]))
    assert abs(correlation[0, 1].item()) < 0.01
