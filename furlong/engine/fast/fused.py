"""Fused elementwise kernels of a decoder layer, each with a torch reference.

They reproduce HF's bf16 rounding order exactly (Qwen/Llama modules): RMSNorm
normalises in float32, rounds, then multiplies by the weight; rotary embedding rounds
q*cos and rotate_half(q)*sin before adding them; SiLU rounds before the product.
Kernels run on CUDA (and under TRITON_INTERPRET=1); elsewhere the references run.
"""
from __future__ import annotations

import torch

from furlong.engine.fast.kernels import triton, use_triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(x, residual, weight, out, residual_out, eps, hidden,
                             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        value = tl.load(x + row * hidden + cols, mask=inside, other=0.0)
        if HAS_RESIDUAL:
            value = (value + tl.load(residual + row * hidden + cols, mask=inside, other=0.0))
        tl.store(residual_out + row * hidden + cols, value, mask=inside)
        value32 = value.to(tl.float32)
        scale = tl.rsqrt(tl.sum(value32 * value32, axis=0) / hidden + eps)
        normed = (value32 * scale).to(x.dtype.element_ty)
        w = tl.load(weight + cols, mask=inside, other=0.0)
        tl.store(out + row * hidden + cols, (w * normed).to(x.dtype.element_ty), mask=inside)

    @triton.jit
    def _head_norm_rope(values, partners, weight, partner_weight, cos, sin, sign, eps,
                        HAS_NORM: tl.constexpr, HEAD_DIM: tl.constexpr):
        """RMSNorm over the head dimension (optional), then rotate_half rotary embedding.

        values (heads, D) and `partners`, the same heads with the halves swapped
        (dimension d holds d +- D/2), so rotate_half(x)[d] = sign[d] * partners[d].
        """
        dtype = values.dtype
        if HAS_NORM:
            v32 = values.to(tl.float32)
            scale = tl.rsqrt(tl.sum(v32 * v32, axis=1) / HEAD_DIM + eps)[:, None]
            values = (weight[None, :] * (v32 * scale).to(dtype)).to(dtype)
            partners = (partner_weight[None, :]
                        * (partners.to(tl.float32) * scale).to(dtype)).to(dtype)
        rotated = (partners.to(tl.float32) * sign[None, :]).to(dtype)
        first = (values * cos[None, :]).to(dtype)
        second = (rotated * sin[None, :]).to(dtype)
        return (first + second).to(dtype)

    @triton.jit
    def _qk_norm_rope_store_kernel(
            qkv, positions, cos_table, sin_table, q_norm, k_norm, eps, query_out, key_out,
            k_cache, v_cache, slot_mapping, stride_qkv, stride_cache_slot,
            NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
            KV_HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr,
            STORE_KEYS: tl.constexpr):
        """One token: normalise and rotate q and k, store k and v into the paged cache."""
        token = tl.program_id(0)
        dims = tl.arange(0, HEAD_DIM)
        half = HEAD_DIM // 2
        partner = tl.where(dims < half, dims + half, dims - half)
        sign = tl.where(dims < half, -1.0, 1.0)
        position = tl.load(positions + token)
        cos = tl.load(cos_table + position * HEAD_DIM + dims)
        sin = tl.load(sin_table + position * HEAD_DIM + dims)
        q_heads = tl.arange(0, HEADS_PAD)
        kv_heads = tl.arange(0, KV_HEADS_PAD)
        q_mask = q_heads[:, None] < NUM_HEADS
        kv_mask = kv_heads[:, None] < NUM_KV_HEADS
        base = qkv + token * stride_qkv
        q_rows = q_heads[:, None] * HEAD_DIM
        k_rows = (NUM_HEADS + kv_heads[:, None]) * HEAD_DIM
        v_rows = (NUM_HEADS + NUM_KV_HEADS + kv_heads[:, None]) * HEAD_DIM
        q = tl.load(base + q_rows + dims[None, :], mask=q_mask, other=0.0)
        q_partner = tl.load(base + q_rows + partner[None, :], mask=q_mask, other=0.0)
        k = tl.load(base + k_rows + dims[None, :], mask=kv_mask, other=0.0)
        k_partner = tl.load(base + k_rows + partner[None, :], mask=kv_mask, other=0.0)
        v = tl.load(base + v_rows + dims[None, :], mask=kv_mask, other=0.0)
        if HAS_NORM:
            q_weight, q_partner_weight = tl.load(q_norm + dims), tl.load(q_norm + partner)
            k_weight, k_partner_weight = tl.load(k_norm + dims), tl.load(k_norm + partner)
        else:  # unused: HAS_NORM is off
            q_weight, q_partner_weight, k_weight, k_partner_weight = cos, cos, cos, cos
        q = _head_norm_rope(q, q_partner, q_weight, q_partner_weight, cos, sin, sign, eps,
                            HAS_NORM, HEAD_DIM)
        k = _head_norm_rope(k, k_partner, k_weight, k_partner_weight, cos, sin, sign, eps,
                            HAS_NORM, HEAD_DIM)
        tl.store(query_out + (token * NUM_HEADS + q_heads[:, None]) * HEAD_DIM + dims[None, :],
                 q, mask=q_mask)
        if STORE_KEYS:
            tl.store(key_out + (token * NUM_KV_HEADS + kv_heads[:, None]) * HEAD_DIM
                     + dims[None, :], k, mask=kv_mask)
        slot = tl.load(slot_mapping + token).to(tl.int64)
        cache_offsets = slot * stride_cache_slot + kv_heads[:, None] * HEAD_DIM + dims[None, :]
        tl.store(k_cache + cache_offsets, k.to(k_cache.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache + cache_offsets, v.to(v_cache.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _silu_mul_kernel(gate_up, out, width, BLOCK: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(gate_up + row * 2 * width + cols, mask=inside, other=0.0)
        up = tl.load(gate_up + row * 2 * width + width + cols, mask=inside, other=0.0)
        g32 = gate.to(tl.float32)
        activated = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
        tl.store(out + row * width + cols, (activated * up).to(gate.dtype), mask=inside)


# ---- references ---------------------------------------------------------------------------
def rms_norm_reference(value: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    v32 = value.float()
    normed = (v32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + eps)).to(value.dtype)
    return weight * normed


def rotate_half(value: torch.Tensor) -> torch.Tensor:
    half = value.shape[-1] // 2
    return torch.cat((-value[..., half:], value[..., :half]), dim=-1)


def rope_reference(value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """value (T, heads, D); cos/sin (T, D)."""
    return value * cos[:, None] + rotate_half(value) * sin[:, None]


# ---- entry points ---------------------------------------------------------------------------
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); without residual, x itself."""
    if not use_triton(x):
        total = x if residual is None else x + residual
        return rms_norm_reference(total, weight, eps), total
    rows, hidden = x.shape
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, x if residual is None else residual, weight, out,
                                  residual_out, eps, hidden, HAS_RESIDUAL=residual is not None,
                                  BLOCK=triton.next_power_of_2(hidden))
    return out, residual_out


def qk_norm_rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                       sin_table: torch.Tensor, q_norm: torch.Tensor | None,
                       k_norm: torch.Tensor | None, eps: float, num_heads: int,
                       num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, return_kv: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """qkv (T, (Hq + 2 Hkv) * D) -> q (T, Hq, D) normalised and rotated; k and v stored
    into the cache at `slot_mapping`, and returned (T, Hkv, D) when `return_kv`."""
    tokens = qkv.shape[0]
    head_dim = cos_table.shape[-1]
    split = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    if not use_triton(qkv):
        q, k, v = (part.reshape(tokens, -1, head_dim) for part in qkv.split(split, dim=-1))
        if q_norm is not None:
            q, k = rms_norm_reference(q, q_norm, eps), rms_norm_reference(k, k_norm, eps)
        cos, sin = cos_table[positions], sin_table[positions]
        q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
        flat = (-1, num_kv_heads, head_dim)
        k_cache.view(flat).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(flat).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return q, (k if return_kv else None), (v.contiguous() if return_kv else None)
    query = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    key = (torch.empty(tokens, num_kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
           if return_kv else query)
    has_norm = q_norm is not None
    _qk_norm_rope_store_kernel[(tokens,)](
        qkv, positions, cos_table, sin_table, q_norm if has_norm else cos_table,
        k_norm if has_norm else cos_table, eps, query, key, k_cache, v_cache, slot_mapping,
        qkv.stride(0), k_cache.stride(1), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_heads),
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        HAS_NORM=has_norm, STORE_KEYS=return_kv)
    value = qkv[:, sum(split[:2]):].reshape(tokens, num_kv_heads, head_dim) if return_kv else None
    return query, (key if return_kv else None), value


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (T, 2F) = [gate | up]."""
    width = gate_up.shape[-1] // 2
    if not use_triton(gate_up):
        gate, up = gate_up[:, :width], gate_up[:, width:]
        return torch.nn.functional.silu(gate) * up
    out = torch.empty(gate_up.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(width, block))](gate_up, out, width,
                                                                    BLOCK=block)
    return out
