"""Packed attention for training, registered with transformers as "furlong_varlen".

HF attention modules call it with (1, heads, T, D) tensors and the sample bounds as
`cu_seq_lens_q` (passed through the model's forward kwargs); the work is done by
`furlong.model.varlen.varlen_causal_attention`. Under tensor parallel the heads are this
rank's share (whole query and KV heads, same grouping), which changes nothing here.
A module marked with `RECOMPUTE_CORE` (--recompute-granularity selective) keeps only
the attention inputs and recomputes the core in the backward. A module given a
`CONTEXT_PARALLEL` layout (train/context_parallel.py: --context-parallel-size) holds this
rank's part of the row: the layout's `scatter_heads` turns its (T', H, D) query, key and
value into the whole row for 1/C of the heads, the core runs on that with the whole row's
`cu_seq_lens`, and `gather_heads` turns the output back.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from furlong.model.varlen import varlen_causal_attention

NAME = "furlong_varlen"
RECOMPUTE_CORE = "furlong_recompute_core"  # attribute set on an attention module
CONTEXT_PARALLEL = "furlong_context_parallel"  # attribute: a train.context_parallel layout


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention interface; returns ((1, T, Hq, D), None)."""
    context_parallel = getattr(module, CONTEXT_PARALLEL, None)
    if cu_seq_lens_q is None:  # one sequence
        if context_parallel is not None:  # the local part is not the whole row
            raise ValueError("context-parallel attention needs the packed row's cu_seq_lens")
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], device=query.device)
        max_length_q = query.shape[2]
    query, key, value = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if context_parallel is not None:
        query, key, value = context_parallel.scatter_heads(query, key, value)
    args = (query, key, value, cu_seq_lens_q, max_length_q, scaling)
    if getattr(module, RECOMPUTE_CORE, False) and torch.is_grad_enabled():
        out = checkpoint(varlen_causal_attention, *args, use_reentrant=False)
    else:
        out = varlen_causal_attention(*args)
    if context_parallel is not None:
        out = context_parallel.gather_heads(out)
    return out[None], None


def _no_mask(*args, **kwargs):
    """Packed attention needs no mask tensor: sample bounds come as cu_seq_lens."""
    return None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, packed_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME
