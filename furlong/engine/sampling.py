"""Token sampling as pure tensor functions, shared by every built-in engine.

Sampling is Gumbel-max with noise that is a hash of (request seed, response position,
token id) instead of a stateful generator: a request's tokens depend only on its own
seed and logits, never on which other requests share the batch or in what order they
arrived. That is what makes rollouts reproducible under continuous batching and
exactly resumable after a restart.

For one row with temperature T > 0, kept set K (top-k, then top-p on the full
distribution, as SGLang does) and noise g_v = -log(-log u_v):
    token = argmax_{v in K} (logits_v / T + g_v)  ~  softmax(logits / T) restricted to K.
The returned log-prob is log_softmax(logits / T)[token] over the FULL vocabulary (what
the trainer recomputes); T = 0 is greedy with the log-prob at T = 1.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27, so (x < 2**32) * _MIX never overflows int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), on int64 tensors holding values < 2**32."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


TOKEN_MULTIPLIER = 0x01000193  # spreads token ids before they meet the row hash


def row_hash(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) int64 values < 2**32: the hash of each row's (seed, step)."""
    seeds = seeds.to(torch.int64)
    row = _mix32(_mix32((seeds & _MASK32) ^ _mix32((seeds >> 32) & _MASK32 ^ 0x5BD1E995)))
    return _mix32(row ^ (steps.to(torch.int64) & _MASK32))


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u in (0, 1) of shape (B, V): a pure function of (seed, step, token id). float32.

    h = mix(mix(row_hash ^ (token * TOKEN_MULTIPLIER))) in 32-bit arithmetic (the fused
    GPU sampler computes the same bits), u = ((h >> 9) + 0.5) / 2**23.
    """
    row = row_hash(seeds, steps)
    tokens = torch.arange(vocab_size, device=row.device, dtype=torch.int64)
    bits = _mix32(_mix32(row[:, None] ^ (tokens * TOKEN_MULTIPLIER & _MASK32)[None, :]))
    # 23 bits: (m + 0.5) / 2**23 is exact in float32 (24-bit significand), so u stays in
    # [2**-24, 1 - 2**-24]. With 24 bits, (2**24 - 0.5) / 2**24 rounds to 1.0: infinite noise.
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf. logits (B, V) float32.

    top_k (B,) int (-1: off); top_p (B,) float (1.0: off). The top-p mass is measured on
    the full softmax (not renormalised after top-k), and the most likely token is always kept.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V) mass of strictly better tokens
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = (rank >= k) | (mass_before > top_p[:, None])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                  filtered: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row. Returns (tokens (B,) int64, log-probs (B,) float32).

    logits (B, V); temperature/top_p (B,) float; top_k/seeds/steps (B,) int. `filtered`:
    whether some row has top-k or top-p (None: find out, which reads back to the host).
    """
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    scaled = logits / scale
    log_probs = scaled.log_softmax(dim=-1)
    candidates = scaled
    if filtered is None:
        filtered = bool(((top_k > 0) | (top_p < 1)).any())
    if filtered:  # rows without top-k/top-p pass through the filter unchanged
        candidates = filter_top_k_top_p(scaled, top_k, top_p)
    gumbel = -torch.log(-torch.log(hash_uniform(seeds, steps, logits.shape[-1])))
    sampled = (candidates + gumbel).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)
