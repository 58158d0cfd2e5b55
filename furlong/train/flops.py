"""Counted FLOPs of a training step, and the perf/* throughput metrics built on them.

Per sample of L tokens with R response tokens, forward:
  2 * P * L                      matmuls of the non-embedding parameters P a token meets
                                 (in an MoE layer: the router, its top-k experts and
                                 the shared experts, not the experts it skips)
  2 * layers * L^2 * heads * d   causal attention (QK^T and AV, half the square each)
  2 * V * H * R                  output projection, only at response positions
Training counts 3x forward (backward is twice the forward: gradients of the activations
and of the weights), or 2x when the base is frozen (--lora-rank: the backward computes the
activations' gradients only; the adapters' own FLOPs, ~1% at rank 32, are not counted).
Recomputation is not counted (MFU measures useful work).
"""
from __future__ import annotations

import torch

from furlong.config.model_check import moe_expected_values

# Dense bf16 peak of the cards MFU is reported against (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops(hf_config, lengths: list[int], response_lengths: list[int]) -> float:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", heads)
    layers = hf_config.num_hidden_layers
    attention_params = hidden * head_dim * (2 * heads + 2 * kv_heads)
    params = layers * attention_params + _mlp_params_per_token(hf_config)
    total = 0.0
    for length, response in zip(lengths, response_lengths, strict=True):
        total += 2 * params * length + 2 * layers * length ** 2 * heads * head_dim
        total += 2 * hf_config.vocab_size * hidden * response
    return total


def _mlp_params_per_token(hf_config) -> int:
    """MLP parameters one token multiplies by, over all layers: the dense MLP's, or in
    an MoE layer the router's, its top-k experts' and the shared experts'."""
    hidden, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    dense = 3 * hidden * hf_config.intermediate_size
    moe = {name: value for name, (value, _) in moe_expected_values(hf_config.to_dict()).items()}
    if not moe:
        return layers * dense
    routed = 3 * hidden * moe["moe_ffn_hidden_size"] * moe["moe_router_topk"]
    shared = 3 * hidden * (moe.get("moe_shared_expert_intermediate_size") or 0)
    sparse = routed + shared + hidden * moe["num_experts"]
    pattern = moe.get("moe_layer_freq") or [1] * layers
    return sum(sparse if is_moe else dense for is_moe in pattern)


def peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak, when known."""
    for card, peak in PEAK_BF16_FLOPS.items():
        if card in device_name:
            return peak
    return None


def train_throughput(hf_config, lengths: list[int], response_lengths: list[int],
                     seconds: float, world_size: int, device: torch.device,
                     frozen_base: bool = False) -> dict:
    """perf/tokens_per_gpu_per_sec, perf/actor_train_tflops and (on known GPUs) MFU of
    `seconds` of training on samples of these lengths, over `world_size` ranks;
    `frozen_base`: only an adapter trains."""
    passes = 2 if frozen_base else 3
    flops = passes * forward_flops(hf_config, lengths, response_lengths)
    metrics = {"perf/tokens_per_gpu_per_sec": sum(lengths) / seconds / world_size,
               "perf/actor_train_tflops": flops / seconds / world_size / 1e12}
    if device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(device))
        if peak:
            metrics["perf/actor_train_mfu"] = flops / seconds / world_size / peak
    return metrics
