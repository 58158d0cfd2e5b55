"""Qwen3-MoE models: the tiny MoE, grouped-GEMM experts, training and saving in HF format."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from furlong.model.loading import load_hf_model
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import pack, split_tokens
from furlong.train.policy import CausalLMPolicy
from conftest import policy_config, random_batch, reference_log_probs


def _saved_names(model_dir) -> set[str]:
    names = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as tensors:
            names.update(tensors.keys())
    return names


def test_tiny_moe_is_a_qwen3_moe_checkpoint_with_per_expert_weights(tiny_moe):
    model = load_hf_model(str(tiny_moe / "model"))
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (8, 2)
    names = _saved_names(tiny_moe / "model")  # the on-disk layout of real Qwen3-MoE
    assert {f"model.layers.1.mlp.experts.{e}.gate_proj.weight" for e in range(8)} <= names
    assert (tiny_moe / "data" / "train.jsonl").is_file()


def test_grouped_gemm_experts_equal_the_per_expert_loop(tiny_moe):
    """HF's grouped-GEMM experts (the default, what the trainer runs) against its eager
    loop over experts, float32 on the CPU, on a packed micro-batch."""
    grouped = load_hf_model(str(tiny_moe / "model"), packed=True).eval()
    eager = load_hf_model(str(tiny_moe / "model"), packed=True).eval()
    eager.set_experts_implementation("eager")
    assert grouped.config._experts_implementation == "grouped_mm"
    assert eager.config._experts_implementation == "eager"
    batch = random_batch(7, grouped.config.vocab_size, seed=1)
    micro = pack(batch, list(range(7)), "cpu")
    with torch.no_grad():
        expected, _ = CausalLMPolicy(eager)(micro)
        values, _ = CausalLMPolicy(grouped)(micro)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)


def test_packed_moe_log_probs_match_unpacked_forwards(tiny_moe):
    model = load_hf_model(str(tiny_moe / "model"), packed=True).eval()
    plain = load_hf_model(str(tiny_moe / "model")).eval()
    batch = random_batch(6, model.config.vocab_size, seed=2)
    micro = pack(batch, list(range(6)), "cpu")
    with torch.no_grad():
        log_probs, _ = CausalLMPolicy(model)(micro)
        for i, values in enumerate(split_tokens(log_probs, micro)):
            expected = reference_log_probs(plain, batch.tokens[i], batch.response_lengths[i], 1.0)
            torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)


def test_the_trainer_trains_the_moe_and_saves_it_in_hf_format(tiny_moe, tmp_path):
    """Every expert and the router get gradients; the exported directory has the per-expert
    HF names and loads back to the trained weights."""
    actor = TrainActor(policy_config(tiny_moe, []), RankInfo(), str(tiny_moe / "model"), 2)
    batch = random_batch(8, actor.model_config.vocab_size, seed=3)
    batch.advantages = [torch.randn(len(m)) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    before = {n: p.detach().clone() for n, p in actor.policy.hf_model.named_parameters()}
    (metrics,) = actor.train(batch)
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    after = dict(actor.policy.hf_model.named_parameters())
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"):
        assert not torch.equal(after[name], before[name]), name
    actor.export_hf(tmp_path / "model")
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in _saved_names(tmp_path / "model")
    reloaded = dict(load_hf_model(str(tmp_path / "model")).named_parameters())
    for name, param in after.items():
        assert torch.equal(reloaded[name], param.detach()), name


@pytest.mark.gpu
def test_gpu_moe_trains_in_bf16_with_float32_masters(tiny_moe):
    actor = TrainActor(policy_config(tiny_moe, []), RankInfo(device=torch.device("cuda")),
                       str(tiny_moe / "model"), 2)
    batch = random_batch(8, actor.model_config.vocab_size, seed=3)
    batch.advantages = [torch.randn(len(m)) for m in batch.loss_masks]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    (metrics,) = actor.train(batch)
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    assert actor.policy.hf_model.config._experts_implementation == "grouped_mm"
