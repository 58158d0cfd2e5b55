"""Packed causal attention on the CPU: both of its paths against an explicit float64
softmax over each sequence alone, and the rule that picks between them."""
from __future__ import annotations

import pytest
import torch

from furlong.model import varlen


def reference(query, key, value, lengths):
    """Per sequence: softmax(q k^T / sqrt(D) + causal mask) v, KV heads repeated."""
    groups = query.shape[1] // key.shape[1]
    outputs, start = [], 0
    for length in lengths:
        q, k, v = (t[start:start + length] for t in (query, key, value))
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("hqk,khd->qhd", weights, v))
        start += length
    return torch.cat(outputs)


def packed_inputs(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    tensors = [torch.randn(total, heads, 16, generator=generator, dtype=torch.float64,
                           requires_grad=True) for heads in (4, 2, 2)]
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return tensors, cu_seq_lens


@pytest.mark.parametrize("padded", [True, False])
def test_both_cpu_paths_equal_attention_over_each_sequence_alone(monkeypatch, padded):
    lengths = [5, 1, 12, 3, 12, 7]
    monkeypatch.setattr(varlen, "_pads_cheaply", lambda lengths, num_heads: padded)
    calls = []
    original = varlen._padded_causal_attention
    monkeypatch.setattr(varlen, "_padded_causal_attention",
                        lambda *args: calls.append(1) or original(*args))
    (query, key, value), cu_seq_lens = packed_inputs(lengths)
    out = varlen.varlen_causal_attention(query, key, value, cu_seq_lens, max(lengths))
    expected = reference(query, key, value, lengths)
    assert bool(calls) == padded
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (query, key, value))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_many_short_sequences_take_one_padded_call_and_a_long_tail_does_not(monkeypatch):
    calls = []
    original = varlen._padded_causal_attention
    monkeypatch.setattr(varlen, "_padded_causal_attention",
                        lambda *args: calls.append(1) or original(*args))
    for lengths, padded in (([18, 20, 22, 19] * 8, True), ([200] + [2] * 30, False)):
        calls.clear()
        (query, key, value), cu_seq_lens = packed_inputs(lengths)
        varlen.varlen_causal_attention(query, key, value, cu_seq_lens, max(lengths))
        assert bool(calls) == padded, lengths


def test_context_parallel_attention_refuses_a_call_without_the_rows_bounds():
    """Under context parallelism the local tokens are 1/C of the row: without cu_seq_lens
    the one-sequence fallback would attend within the local part only."""
    from torch import nn
    from furlong.model.attention import CONTEXT_PARALLEL, packed_attention
    module = nn.Module()
    setattr(module, CONTEXT_PARALLEL, object())
    query = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        packed_attention(module, query, query, query, None)
