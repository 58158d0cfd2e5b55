"""Counted FLOPs of a training step, and the perf/* throughput metrics built on them.

Per sample of L tokens with R response tokens, forward:
  2 * P * L                      matmuls of the non-embedding parameters P
  2 * layers * L^2 * heads * d   causal attention (QK^T and AV, half the square each)
  2 * V * H * R                  output projection, only at response positions
Training counts 3x forward (backward is twice the forward); recomputation is not
counted (MFU measures useful work).
"""
from __future__ import annotations

import torch

# Dense bf16 peak of the cards MFU is reported against (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops(hf_config, lengths: list[int], response_lengths: list[int]) -> float:
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    kv_heads = getattr(hf_config, "num_key_value_heads", heads)
    layers = hf_config.num_hidden_layers
    attention_params = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp_params = 3 * hidden * hf_config.intermediate_size
    params = layers * (attention_params + mlp_params)
    total = 0.0
    for length, response in zip(lengths, response_lengths, strict=True):
        total += 2 * params * length + 2 * layers * length ** 2 * heads * head_dim
        total += 2 * hf_config.vocab_size * hidden * response
    return total


def peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak, when known."""
    for card, peak in PEAK_BF16_FLOPS.items():
        if card in device_name:
            return peak
    return None


def train_throughput(hf_config, lengths: list[int], response_lengths: list[int],
                     seconds: float, world_size: int, device: torch.device) -> dict:
    """perf/tokens_per_gpu_per_sec, perf/actor_train_tflops and (on known GPUs) MFU of
    `seconds` of training on samples of these lengths, over `world_size` ranks."""
    flops = 3 * forward_flops(hf_config, lengths, response_lengths)
    metrics = {"perf/tokens_per_gpu_per_sec": sum(lengths) / seconds / world_size,
               "perf/actor_train_tflops": flops / seconds / world_size / 1e12}
    if device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(device))
        if peak:
            metrics["perf/actor_train_mfu"] = flops / seconds / world_size / peak
    return metrics
