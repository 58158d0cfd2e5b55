"""The fast engine's kernels: paged decode attention and fused sampling.

Each has a Triton kernel for CUDA and a plain-torch reference with the same contract
(used on the CPU and in tests; the Triton code also runs under TRITON_INTERPRET=1).

KV cache layout, one per layer: (num_blocks, block_size, num_kv_heads, head_dim); a
sequence's token p lives in block block_table[p // block_size], row p % block_size.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from furlong.engine.sampling import TOKEN_MULTIPLIER, row_hash, sample_tokens

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without triton use the references
    triton = None


# ---- decode attention -------------------------------------------------------------------
def paged_decode_attention_reference(query, k_cache, v_cache, block_tables, context_lens,
                                     scale: float) -> torch.Tensor:
    """query (B, Hq, D), one new token per sequence attending to its whole context."""
    block_size = k_cache.shape[1]
    outputs = []
    for b in range(query.shape[0]):
        length = int(context_lens[b])
        positions = torch.arange(length, device=query.device)
        blocks = block_tables[b, positions // block_size].long()
        keys = k_cache[blocks, positions % block_size]    # (L, Hkv, D)
        values = v_cache[blocks, positions % block_size]
        out = F.scaled_dot_product_attention(
            query[b, :, None].float(), keys.transpose(0, 1).float(),
            values.transpose(0, 1).float(), scale=scale,
            enable_gqa=query.shape[1] != keys.shape[1])  # (Hq, 1, D)
        outputs.append(out[:, 0].to(query.dtype))
    return torch.stack(outputs)


if triton is not None:
    @triton.jit
    def _decode_partial_kernel(
            query, k_cache, v_cache, block_tables, context_lens, partial_out, partial_max,
            partial_sum, scale, stride_qb, stride_qh, stride_kb, stride_kr, stride_kh,
            stride_tb, num_splits, out, stride_ob, stride_oh, GROUP: tl.constexpr,
            GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            TILE: tl.constexpr, SINGLE_SPLIT: tl.constexpr):
        """One (sequence, kv head, split): online softmax over its share of the context,
        TILE tokens (TILE / BLOCK_SIZE pages) at a time. With one split the result is
        final and goes straight to `out`."""
        batch, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(context_lens + batch)
        num_tiles = tl.cdiv(length, TILE)
        per_split = tl.cdiv(num_tiles, num_splits)
        first, last = split * per_split, tl.minimum((split + 1) * per_split, num_tiles)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + rows
        q = tl.load(query + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=rows[:, None] < GROUP, other=0.0)
        best = tl.full((GROUP_PAD,), -1e30, tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        offsets = tl.arange(0, TILE)
        for tile in tl.range(first, last):
            tokens = tile * TILE + offsets
            valid = tokens < length
            blocks = tl.load(block_tables + batch * stride_tb + tokens // BLOCK_SIZE,
                             mask=valid, other=0).to(tl.int64)
            rows_kv = blocks * stride_kb + (tokens % BLOCK_SIZE) * stride_kr + kv_head * stride_kh
            kv_offsets = rows_kv[:, None] + dims[None, :]
            keys = tl.load(k_cache + kv_offsets, mask=valid[:, None], other=0.0)
            values = tl.load(v_cache + kv_offsets, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(keys)).to(tl.float32) * scale  # (GROUP_PAD, TILE)
            scores = tl.where(valid[None, :], scores, -1e30)
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(weights, axis=1)
            acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values).to(tl.float32)
            best = new_best
        if SINGLE_SPLIT:
            result = acc / tl.maximum(total, 1e-30)[:, None]
            tl.store(out + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                     result.to(out.dtype.element_ty), mask=rows[:, None] < GROUP)
        else:
            out_row = (batch * tl.num_programs(1) + kv_head) * num_splits + split
            tl.store(partial_out + (out_row * GROUP_PAD + rows[:, None]) * HEAD_DIM
                     + dims[None, :], acc)
            tl.store(partial_max + out_row * GROUP_PAD + rows, best)
            tl.store(partial_sum + out_row * GROUP_PAD + rows, total)

    @triton.jit
    def _decode_combine_kernel(partial_out, partial_max, partial_sum, out, num_splits,
                               stride_ob, stride_oh, GROUP: tl.constexpr,
                               GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Merge the splits of one (sequence, kv head): rescale by the global max."""
        batch, kv_head = tl.program_id(0), tl.program_id(1)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        first = (batch * tl.num_programs(1) + kv_head) * num_splits
        best = tl.full((GROUP_PAD,), -1e30, tl.float32)
        for split in tl.range(0, num_splits):
            best = tl.maximum(best, tl.load(partial_max + (first + split) * GROUP_PAD + rows))
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
        for split in tl.range(0, num_splits):
            row = first + split
            weight = tl.exp(tl.load(partial_max + row * GROUP_PAD + rows) - best)
            total += weight * tl.load(partial_sum + row * GROUP_PAD + rows)
            acc += weight[:, None] * tl.load(
                partial_out + (row * GROUP_PAD + rows[:, None]) * HEAD_DIM + dims[None, :])
        result = acc / tl.maximum(total, 1e-30)[:, None]
        heads = kv_head * GROUP + rows
        tl.store(out + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 result.to(out.dtype.element_ty), mask=rows[:, None] < GROUP)


def decode_splits(batch: int, kv_heads: int, num_sms: int = 132, max_splits: int = 16) -> int:
    """Splits of the context so that (batch x kv_heads x splits) programs fill the GPU twice."""
    return max(1, min(max_splits, math.ceil(2 * num_sms / max(batch * kv_heads, 1))))


def paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale: float,
                           num_splits: int = 1, tile: int = 128, num_warps: int = 4,
                           num_stages: int = 3) -> torch.Tensor:
    """(B, Hq, D) attention of each sequence's new token over its paged context.

    `tile` tokens are read per iteration (a multiple of the block size)."""
    if not use_triton(query):
        return paged_decode_attention_reference(query, k_cache, v_cache, block_tables,
                                                context_lens, scale)
    batch, heads, dim = query.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))
    rows = batch * kv_heads * num_splits * group_pad if num_splits > 1 else 1
    partial_out = torch.empty(rows, dim, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(rows, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty(rows, dtype=torch.float32, device=query.device)
    out = torch.empty_like(query)
    _decode_partial_kernel[(batch, kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, partial_out, partial_max,
        partial_sum, scale, query.stride(0), query.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), num_splits, out,
        out.stride(0), out.stride(1), GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim,
        BLOCK_SIZE=block_size, TILE=max(tile, block_size), SINGLE_SPLIT=num_splits == 1,
        num_warps=num_warps, num_stages=num_stages)
    if num_splits == 1:
        return out
    _decode_combine_kernel[(batch, kv_heads)](
        partial_out, partial_max, partial_sum, out, num_splits, out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim)
    return out


# ---- sampling ---------------------------------------------------------------------------
if triton is not None:
    _TOKEN_MULTIPLIER: tl.constexpr = tl.constexpr(TOKEN_MULTIPLIER)

    @triton.jit
    def _mix32(x):
        x = ((x >> 16) ^ x) * 0x45D9F3B
        x = ((x >> 16) ^ x) * 0x45D9F3B
        return (x >> 16) ^ x

    @triton.jit
    def _sample_kernel(logits, stride_l, row_hashes, inv_temperature, greedy, part_max,
                       part_sum, part_key, part_token, part_logit, vocab_size, per_split,
                       BLOCK_V: tl.constexpr):
        """One (row, vocab split): the split's logsumexp pieces and its best key
        logits/T + Gumbel(hash) (the winner's token and scaled logit)."""
        row, split = tl.program_id(0), tl.program_id(1)
        row_hash = tl.load(row_hashes + row).to(tl.uint32)
        scale = tl.load(inv_temperature + row)
        is_greedy = tl.load(greedy + row) != 0
        running_max = tl.full((), -1e30, tl.float32)
        running_sum = tl.zeros((), tl.float32)
        best_key = tl.full((), float("-inf"), tl.float32)
        best_token = tl.zeros((), tl.int64)
        best_logit = tl.zeros((), tl.float32)
        first = split * per_split
        end = tl.minimum(first + per_split, vocab_size)
        for start in tl.range(first, end, BLOCK_V):
            ids = start + tl.arange(0, BLOCK_V)
            inside = ids < end
            z = tl.load(logits + row * stride_l + ids, mask=inside,
                        other=float("-inf")).to(tl.float32) * scale
            chunk_max = tl.maximum(running_max, tl.max(z))
            running_sum = (running_sum * tl.exp(running_max - chunk_max)
                           + tl.sum(tl.exp(z - chunk_max)))
            running_max = chunk_max
            bits = _mix32(_mix32(row_hash ^ (ids.to(tl.uint32) * _TOKEN_MULTIPLIER)))
            uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            gumbel = -tl.log(-tl.log(uniform))
            key = tl.where(inside, tl.where(is_greedy, z, z + gumbel), float("-inf"))
            chunk_best = tl.max(key)
            chunk_token = tl.argmax(key, axis=0)
            take = chunk_best > best_key
            best_key = tl.where(take, chunk_best, best_key)
            best_token = tl.where(take, start + chunk_token, best_token)
            best_logit = tl.where(take, tl.sum(tl.where(tl.arange(0, BLOCK_V) == chunk_token,
                                                        z, 0.0)), best_logit)
        out = row * tl.num_programs(1) + split
        tl.store(part_max + out, running_max)
        tl.store(part_sum + out, running_sum)
        tl.store(part_key + out, best_key)
        tl.store(part_token + out, best_token)
        tl.store(part_logit + out, best_logit)


SAMPLE_SPLITS = 16  # vocabulary splits per row: (rows x 16) programs fill the GPU


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                 steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` without top-k/top-p, reading the logits once. (B,) tokens, log-probs."""
    if not use_triton(logits):
        batch = logits.shape[0]
        no_filter = torch.full((batch,), -1, device=logits.device)
        return sample_tokens(logits, temperature, no_filter, torch.ones_like(temperature),
                             seeds, steps)
    greedy = temperature <= 0
    inv_temperature = torch.where(greedy, torch.ones_like(temperature), 1.0 / temperature)
    rows, vocab = logits.shape
    block = 2048
    per_split = triton.cdiv(triton.cdiv(vocab, SAMPLE_SPLITS), block) * block
    splits = triton.cdiv(vocab, per_split)
    parts = [torch.empty(rows, splits, dtype=dtype, device=logits.device)
             for dtype in (torch.float32, torch.float32, torch.float32, torch.int64,
                           torch.float32)]
    _sample_kernel[(rows, splits)](
        logits, logits.stride(0), row_hash(seeds, steps), inv_temperature.float(),
        greedy.to(torch.int8), *parts, vocab, per_split, BLOCK_V=block)
    part_max, part_sum, part_key, part_token, part_logit = parts
    # Merge the splits: logsumexp of the pieces; the first split with the best key wins.
    total_max = part_max.max(dim=1, keepdim=True).values
    normalizer = total_max[:, 0] + (part_sum * torch.exp(part_max - total_max)).sum(1).log()
    winner = part_key.argmax(dim=1, keepdim=True)
    tokens = part_token.gather(1, winner)[:, 0]
    return tokens, part_logit.gather(1, winner)[:, 0] - normalizer


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors (and anywhere under the Triton interpreter)."""
    return triton is not None and (tensor.is_cuda or _interpreting())
