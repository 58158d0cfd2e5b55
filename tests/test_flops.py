"""Counted FLOPs: the parameters a token meets, dense and MoE, against the modules."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from furlong.train.flops import forward_flops, train_throughput


def _active_matmul_params(model, top_k: int = 0, experts: int = 1) -> float:
    """Non-embedding weight matrices counted from the modules: expert tensors scaled by
    the share of experts a token is routed to."""
    total = 0.0
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embed" in name or "lm_head" in name:
            continue
        total += param.numel() * (top_k / experts if ".experts." in name else 1)
    return total


def _flops_without_attention_and_head(config, length: int) -> float:
    return forward_flops(config, [length], [0]) - 2 * config.num_hidden_layers * length ** 2 \
        * config.num_attention_heads * config.head_dim


def test_dense_count_is_twice_the_matmul_parameters(tiny):
    config = AutoConfig.from_pretrained(tiny / "model")
    model = AutoModelForCausalLM.from_config(config)
    expected = 2 * _active_matmul_params(model) * 5
    assert _flops_without_attention_and_head(config, 5) == expected


def test_moe_counts_only_the_experts_a_token_is_routed_to(tiny_moe):
    config = AutoConfig.from_pretrained(tiny_moe / "model")
    model = AutoModelForCausalLM.from_config(config)
    active = _active_matmul_params(model, config.num_experts_per_tok, config.num_experts)
    assert _flops_without_attention_and_head(config, 7) == 2 * active * 7
    assert active < _active_matmul_params(model, config.num_experts, config.num_experts)


def test_a_frozen_base_counts_the_backward_once_not_twice(tiny):
    """Full fine-tuning: forward + the gradients of activations and weights (3x forward);
    LoRA: the base's weights take no gradient (2x forward)."""
    config = AutoConfig.from_pretrained(tiny / "model")
    forward = forward_flops(config, [7, 9], [3, 4])
    cpu = torch.device("cpu")
    full = train_throughput(config, [7, 9], [3, 4], 2.0, 1, cpu)
    adapter = train_throughput(config, [7, 9], [3, 4], 2.0, 1, cpu, frozen_base=True)
    assert full["perf/actor_train_tflops"] == 3 * forward / 2.0 / 1e12
    assert adapter["perf/actor_train_tflops"] == 2 * forward / 2.0 / 1e12
    assert adapter["perf/tokens_per_gpu_per_sec"] == full["perf/tokens_per_gpu_per_sec"] == 8
