"""Causal attention over packed sequences (several sequences back to back in one row).

`cu_seq_lens` is the running sum of the sequence lengths: (num_seqs + 1,). Attention is
causal within a sequence and never crosses sequences, and no (T, T) mask is built: on
GPU one call of the variable-length flash kernel (`torch.nn.attention.varlen`),
elsewhere one SDPA call over the sequences padded to the longest (many short sequences,
as in RL rollouts: one call instead of one per sequence) or one causal SDPA call per
sequence (when padding would more than double the work or the score matrix is large).
Used by the trainer (packed micro-batches) and by the fast engine (batched prefill).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn
    _PARAMETERS = inspect.signature(varlen_attn).parameters
    # torch 2.11 spells causality is_causal; later releases use a window.
    _CAUSAL = {"is_causal": True} if "is_causal" in _PARAMETERS else {"window_size": (-1, 0)}
    _NATIVE_GQA = "enable_gqa" in _PARAMETERS
except ImportError:  # torch without the varlen flash kernel
    varlen_attn = None

_PADDED_SCORES = 1 << 24  # most (B, H, L, L) attention scores the padded CPU path holds


def _flash_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The half dtype the flash kernel would run in (the autocast dtype if on), or None."""
    dtype = query.dtype
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def varlen_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            cu_seq_lens: torch.Tensor, max_length: int,
                            scale: float | None = None) -> torch.Tensor:
    """query (T, Hq, D), key/value (T, Hkv, D) -> (T, Hq, D). The flash kernel needs
    bf16/fp16 (under autocast the inputs are cast); otherwise SDPA, padded or per sequence."""
    groups = query.shape[1] // key.shape[1]
    dtype = _flash_dtype(query) if query.is_cuda else None
    if varlen_attn is not None and dtype is not None:
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        extra = dict(_CAUSAL)
        if groups > 1 and _NATIVE_GQA:
            extra["enable_gqa"] = True
        elif groups > 1:
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        cu = cu_seq_lens.to(torch.int32)
        # max_length goes in as given: int() of a compiled layer's symbolic length would
        # specialise the graph to one value and recompile for every micro-batch.
        return varlen_attn(query, key, value, cu, cu, max_length, max_length,
                           scale=scale, **extra)
    if _pads_cheaply(cu_seq_lens.diff(), query.shape[1]):
        return _padded_causal_attention(query, key, value, cu_seq_lens, int(max_length), scale)
    bounds = cu_seq_lens.tolist()
    pieces = [F.scaled_dot_product_attention(
        query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1),
        is_causal=True, scale=scale, enable_gqa=groups > 1).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(pieces, dim=0)


def _pads_cheaply(lengths: torch.Tensor, num_heads: int) -> bool:
    """Padding to the longest at most doubles the attention scores, and they fit the cap."""
    num_padded = len(lengths) * num_heads * int(lengths.max()) ** 2
    return num_padded <= min(_PADDED_SCORES, 2 * num_heads * int((lengths ** 2).sum()))


def _padded_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             cu_seq_lens: torch.Tensor, max_length: int,
                             scale: float | None) -> torch.Tensor:
    """The sequences padded to (B, H, L, D) and one SDPA call whose mask is causal and
    hides the padding keys; the padding rows are dropped again. -> (T, Hq, D)."""
    starts, lengths = cu_seq_lens[:-1], cu_seq_lens.diff()  # (B,)
    positions = torch.arange(max_length, device=query.device)  # (L,)
    valid = positions[None] < lengths[:, None]  # (B, L)
    index = (starts[:, None] + positions[None]).clamp(max=query.shape[0] - 1)  # (B, L)
    q, k, v = (tensor[index].transpose(1, 2) for tensor in (query, key, value))
    causal = positions[None, :] <= positions[:, None]  # (L, L), query row, key column
    mask = causal[None] & valid[:, None, :]  # (B, L, L): a row always sees its key 0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)[valid]  # (T, Hq, D), the packed order
