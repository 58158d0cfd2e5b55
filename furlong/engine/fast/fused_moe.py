"""Fused-MoE kernels: the routed experts of a batch of tokens as two grouped GEMMs.

A token routed to k experts makes k (token, expert) pairs; pair p = token * k + slot.
`align_pairs` groups the pairs by expert, each expert's run padded to a multiple of
BLOCK_M rows: `sorted_pairs` (pair ids, `num_pairs` marking padding), `block_experts`
(the expert of each BLOCK_M rows) and `num_padded` (rows in use). It runs on the
device in one kernel, sized by a bound known on the host (no read-back), so a decode
step that calls it can be captured in a CUDA graph. `_expert_matmul_kernel` then
multiplies each block of rows by its expert's weight: once with `gate_up_proj`
(E, 2I, H) reading the token's hidden state, SiLU-mul between, once with `down_proj`
(E, H, I) scaling each pair by its routing weight; the k pairs of a token are summed.

Rounding follows HF's Qwen3-MoE experts: GEMM outputs rounded to the dtype, the routing
weight (already in the dtype) applied after the down projection. Kernels run on CUDA
and under TRITON_INTERPRET=1; elsewhere the references run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from furlong.engine.fast.fused import silu_mul
from furlong.engine.fast.kernels import triton, use_triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _align_kernel(expert_ids, num_pairs, sorted_pairs, block_experts, num_padded,
                      NUM_EXPERTS: tl.constexpr, BINS: tl.constexpr, BLOCK_M: tl.constexpr,
                      CHUNK: tl.constexpr):
        """Program e: count every expert's pairs, find e's padded offset, write e's pairs
        there in pair order, fill its padding and name e in its blocks. Loads past the
        end count in bin NUM_EXPERTS (BINS > NUM_EXPERTS), which is then dropped."""
        expert = tl.program_id(0)
        offsets = tl.arange(0, CHUNK)
        counts = tl.zeros((BINS,), tl.int32)
        for start in tl.range(0, num_pairs, CHUNK):
            ids = tl.load(expert_ids + start + offsets, mask=start + offsets < num_pairs,
                          other=NUM_EXPERTS).to(tl.int32)
            counts += tl.histogram(ids, BINS)
        bins = tl.arange(0, BINS)
        padded = tl.where(bins < NUM_EXPERTS, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        mine = bins == expert
        end = tl.sum(tl.where(mine, tl.cumsum(padded, axis=0), 0))
        first = end - tl.sum(tl.where(mine, padded, 0))
        placed = tl.full((), 0, tl.int32)
        for start in tl.range(0, num_pairs, CHUNK):
            ids = tl.load(expert_ids + start + offsets, mask=start + offsets < num_pairs,
                          other=-1)
            hit = (ids == expert).to(tl.int32)
            rows = first + placed + tl.cumsum(hit, axis=0) - 1
            tl.store(sorted_pairs + rows, start + offsets, mask=hit != 0)
            placed += tl.sum(hit)
        for row in tl.range(first + placed, end, CHUNK):
            tl.store(sorted_pairs + row + offsets, num_pairs, mask=row + offsets < end)
        for block in tl.range(first // BLOCK_M, end // BLOCK_M, CHUNK):
            tl.store(block_experts + block + offsets, expert,
                     mask=block + offsets < end // BLOCK_M)
        if expert == 0:
            tl.store(num_padded, tl.sum(padded))

    @triton.jit
    def _expert_matmul_kernel(
            inputs, weights, out, sorted_pairs, block_experts, num_padded, pair_weights,
            num_pairs, n_size, k_size, stride_in, stride_we, stride_wn, stride_wk, stride_out,
            ROWS_PER_INPUT: tl.constexpr, APPLY_WEIGHTS: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[pair, n-tile] = inputs[pair // ROWS_PER_INPUT] @ weights[expert].T for the
        BLOCK_M pairs of one block (scaled by the pair's routing weight if asked)."""
        block, tile = tl.program_id(0), tl.program_id(1)
        if block * BLOCK_M >= tl.load(num_padded):
            return
        pairs = tl.load(sorted_pairs + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = (pairs // ROWS_PER_INPUT).to(tl.int64)
        expert = tl.load(block_experts + block).to(tl.int64)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_size
        depth = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in tl.range(0, k_size, BLOCK_K):
            k_ok = k + depth < k_size
            x = tl.load(inputs + rows[:, None] * stride_in + (k + depth)[None, :],
                        mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weights + expert * stride_we + cols[None, :] * stride_wn
                        + (k + depth)[:, None] * stride_wk,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        result = acc.to(out.dtype.element_ty)
        if APPLY_WEIGHTS:
            scale = tl.load(pair_weights + pairs, mask=valid, other=0.0)
            result = (result * scale[:, None]).to(out.dtype.element_ty)
        tl.store(out + pairs.to(tl.int64)[:, None] * stride_out + cols[None, :], result,
                 mask=valid[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Decode (few pairs per expert): thin row blocks, long K tiles, weights streamed.
DECODE_TILES = TileConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
PREFILL_TILES = TileConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)


def tile_config(num_pairs: int, num_experts: int) -> TileConfig:
    """Thin blocks while experts average at most 16 pairs (every decode batch of Qwen3-30B-A3B
    up to 256 sequences), wide ones for prefill."""
    return DECODE_TILES if num_pairs <= 16 * num_experts else PREFILL_TILES


def padded_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows `sorted_pairs` may need: every non-empty expert pads fewer than block_m rows."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


# ---- references ---------------------------------------------------------------------------
def align_pairs_reference(expert_ids: torch.Tensor, num_experts: int, block_m: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_pairs` in torch ops (blocks past `num_padded` name the last expert)."""
    flat = expert_ids.flatten()
    num_pairs = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    capacity = padded_capacity(num_pairs, num_experts, block_m)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    ranks = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[experts]
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[(ends - padded)[experts] + ranks] = order.to(torch.int32)
    starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_experts = torch.searchsorted(ends, starts, right=True).clamp(max=num_experts - 1)
    return sorted_pairs, block_experts.to(torch.int32), ends[-1:].to(torch.int32)


def fused_experts_reference(hidden: torch.Tensor, gate_up_proj: torch.Tensor,
                            down_proj: torch.Tensor, expert_ids: torch.Tensor,
                            routing_weights: torch.Tensor) -> torch.Tensor:
    """`fused_experts` one expert at a time (reads the ids on the host)."""
    num_tokens, top_k = expert_ids.shape
    flat, flat_weights = expert_ids.flatten(), routing_weights.flatten()
    out = hidden.new_zeros(num_tokens * top_k, hidden.shape[1])
    for expert in flat.unique().tolist():
        pairs = (flat == expert).nonzero()[:, 0]
        gate, up = F.linear(hidden[pairs // top_k], gate_up_proj[expert]).chunk(2, dim=-1)
        down = F.linear(F.silu(gate) * up, down_proj[expert])
        out[pairs] = down * flat_weights[pairs, None]
    return out.view(num_tokens, top_k, -1).sum(1)


# ---- entry points -------------------------------------------------------------------------
def align_pairs(expert_ids: torch.Tensor, num_experts: int, block_m: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids (T, k) -> sorted_pairs (capacity,) int32, block_experts (capacity /
    block_m,) int32, num_padded (1,) int32; only the first num_padded rows are defined."""
    if not use_triton(expert_ids):
        return align_pairs_reference(expert_ids, num_experts, block_m)
    num_pairs = expert_ids.numel()
    capacity = padded_capacity(num_pairs, num_experts, block_m)
    device = expert_ids.device
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
    block_experts = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    _align_kernel[(num_experts,)](
        expert_ids.flatten(), num_pairs, sorted_pairs, block_experts, num_padded,
        NUM_EXPERTS=num_experts, BINS=triton.next_power_of_2(num_experts + 1), BLOCK_M=block_m,
        CHUNK=min(1024, max(16, triton.next_power_of_2(num_pairs))))
    return sorted_pairs, block_experts, num_padded


def _expert_matmul(inputs, weights, out, alignment, num_pairs: int, rows_per_input: int,
                   pair_weights: torch.Tensor | None, tiles: TileConfig) -> None:
    sorted_pairs, block_experts, num_padded = alignment
    n_size, k_size = weights.shape[1], weights.shape[2]
    grid = (block_experts.numel(), triton.cdiv(n_size, tiles.block_n))
    _expert_matmul_kernel[grid](
        inputs, weights, out, sorted_pairs, block_experts, num_padded,
        out if pair_weights is None else pair_weights, num_pairs, n_size, k_size,
        inputs.stride(0), weights.stride(0), weights.stride(1), weights.stride(2),
        out.stride(0), ROWS_PER_INPUT=rows_per_input, APPLY_WEIGHTS=pair_weights is not None,
        IEEE=inputs.dtype == torch.float32, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def fused_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  expert_ids: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """hidden (T, H), expert_ids and routing_weights (T, k) -> (T, H): the sum over each
    token's k experts of weight * down(silu(gate) * up)."""
    if not use_triton(hidden):
        return fused_experts_reference(hidden, gate_up_proj, down_proj, expert_ids,
                                       routing_weights)
    num_tokens, top_k = expert_ids.shape
    num_pairs, num_experts = num_tokens * top_k, gate_up_proj.shape[0]
    tiles = tile_config(num_pairs, num_experts)
    alignment = align_pairs(expert_ids, num_experts, tiles.block_m)
    gate_up = hidden.new_empty(num_pairs, gate_up_proj.shape[1])
    _expert_matmul(hidden, gate_up_proj, gate_up, alignment, num_pairs, top_k, None, tiles)
    activated = silu_mul(gate_up)  # (P, I)
    down = hidden.new_empty(num_pairs, down_proj.shape[1])
    _expert_matmul(activated, down_proj, down, alignment, num_pairs, 1,
                   routing_weights.flatten().contiguous(), tiles)
    return down.view(num_tokens, top_k, -1).sum(1)
