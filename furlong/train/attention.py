"""Attention over packed micro-batches, registered with transformers as "furlong_varlen".

A packed row holds several samples back to back; `cu_seq_lens` (the running sum of
their lengths) says where each starts. Attention is causal within a sample and never
crosses samples, with no (T, T) mask ever built: on GPU one variable-length flash
kernel call (`torch.nn.attention.varlen.varlen_attn`), elsewhere one causal SDPA call
per sample.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "furlong_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn
    _PARAMETERS = inspect.signature(varlen_attn).parameters
    # torch 2.11 spells causality is_causal; later releases use a window.
    _VARLEN_CAUSAL = {"is_causal": True} if "is_causal" in _PARAMETERS else {"window_size": (-1, 0)}
    _VARLEN_GQA = "enable_gqa" in _PARAMETERS
except ImportError:  # torch without the varlen flash kernel
    varlen_attn = None


def _per_sample_sdpa(query, key, value, cu_seq_lens, scaling):
    """query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, Hq, T, D)."""
    bounds = cu_seq_lens.tolist()
    pieces = [F.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1]) for s, e in zip(bounds, bounds[1:])]
    return torch.cat(pieces, dim=2)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention interface; returns ((1, T, Hq, D), None)."""
    if cu_seq_lens_q is None:  # one sequence
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], device=query.device)
        max_length_q = query.shape[2]
    if varlen_attn is not None and query.is_cuda:
        groups = query.shape[1] // key.shape[1]
        extra = dict(_VARLEN_CAUSAL)
        if groups > 1 and _VARLEN_GQA:
            extra["enable_gqa"] = True
        elif groups > 1:
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        cu = cu_seq_lens_q.to(torch.int32)
        out = varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1),
                          value[0].transpose(0, 1), cu, cu, int(max_length_q), int(max_length_q),
                          scale=scaling, **extra)
        return out[None], None
    out = _per_sample_sdpa(query, key, value, cu_seq_lens_q, scaling)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Packed attention needs no mask tensor: sample bounds come as cu_seq_lens."""
    return None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME
