"""Qwen3-MoE models: the tiny MoE, grouped-GEMM experts, training and saving in HF format."""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer

from furlong import cli
from furlong.config import ConfigError, load_config
from furlong.engine.hf_engine import HFEngine
from furlong.model.loading import checkpoint_named_tensors, load_hf_model, load_named_tensors
from furlong.model.moe import load_balancing_loss, sequence_load_balancing_loss
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import pack, split_tokens
from furlong.output.metrics import read_metrics
from furlong.ports import free_port
from furlong.train import parallel
from furlong.train.policy import CausalLMPolicy
from conftest import (model_args, policy_config, random_batch, reference_log_probs,
                      train_argv, trainer_batch)
from test_parallel import step_gradients


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
    batch = trainer_batch(actor, 8, seed=3)
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
    batch = trainer_batch(actor, 8, seed=3)
    (metrics,) = actor.train(batch)
    assert math.isfinite(metrics["train/loss"]) and metrics["train/grad_norm"] > 0
    assert metrics["train/moe_aux_loss"] > 0
    assert actor.policy.hf_model.config._experts_implementation == "grouped_mm"
    assert all(p.dtype == torch.bfloat16 for p in actor.policy.parameters())
    assert all(m.dtype == torch.float32 for m in actor.masters.parameters())
    moments = [s["exp_avg"] for s in actor.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)


# ---- load-balancing loss ---------------------------------------------------------------
def _loop_load_balancing_loss(logits: torch.Tensor, indices: torch.Tensor) -> float:
    """Megatron's switch load-balancing loss, written out term by term."""
    tokens, experts = logits.shape
    top_k = indices.shape[1]
    probs = logits.double().softmax(-1)
    total = 0.0
    for e in range(experts):
        routed = sum(int(e in indices[t].tolist()) for t in range(tokens))
        total += float(probs[:, e].sum()) * routed
    return experts / (top_k * tokens * tokens) * total


def test_load_balancing_loss_is_megatrons_formula():
    torch.manual_seed(0)
    logits = torch.randn(13, 8)
    indices = logits.topk(2, dim=-1).indices
    assert float(load_balancing_loss(logits, indices)) == pytest.approx(
        _loop_load_balancing_loss(logits, indices), rel=1e-6)
    even = torch.arange(16).reshape(8, 2) % 8  # every expert routed twice, uniform router
    assert float(load_balancing_loss(torch.zeros(8, 8), even)) == pytest.approx(1.0)


def _one_micro_batch_actor(tiny_moe, coeff: str) -> TrainActor:
    flags = ["--moe-aux-loss-coeff", coeff, "--use-dynamic-batch-size",
             "--max-tokens-per-gpu", "4096"]
    return TrainActor(policy_config(tiny_moe, flags), RankInfo(), str(tiny_moe / "model"), 2)


def test_the_trainer_logs_and_follows_the_aux_loss_coefficient(tiny_moe):
    """train/moe_aux_loss is the layers' mean loss of the step's forward, and the
    coefficient adds exactly coeff * d(sum over layers of the loss)/d(weights) to the
    gradients; both against HF's own router logits (one micro-batch: its share is 1)."""
    batch = random_batch(8, 22, seed=5)
    batch.advantages = [torch.randn(len(m)) for m in batch.loss_masks]
    grads, metrics = {}, {}
    for coeff in ("0", "10"):
        actor = _one_micro_batch_actor(tiny_moe, coeff)
        batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
        metrics[coeff], grads[coeff] = step_gradients(actor, batch)
    model = load_hf_model(str(tiny_moe / "model"), packed=True)
    micro = pack(batch, list(range(len(batch))), "cpu")
    logits = model(input_ids=micro.input_ids, position_ids=micro.position_ids,
                   cu_seq_lens_q=micro.cu_seq_lens, cu_seq_lens_k=micro.cu_seq_lens,
                   max_length_q=micro.max_length, max_length_k=micro.max_length,
                   output_router_logits=True).router_logits
    routes = [layer.softmax(-1).topk(2).indices for layer in logits]
    expected = sum(_loop_load_balancing_loss(layer.detach(), routed)
                   for layer, routed in zip(logits, routes, strict=True)) / len(logits)
    for coeff in ("0", "10"):
        assert metrics[coeff]["train/moe_aux_loss"] == pytest.approx(expected, rel=1e-4)
    total = sum(load_balancing_loss(layer, routed)
                for layer, routed in zip(logits, routes, strict=True))
    total.backward()
    for name, param in model.named_parameters():
        extra = grads["10"][name] - grads["0"][name]
        reference = 10 * param.grad if param.grad is not None else torch.zeros_like(extra)
        torch.testing.assert_close(extra, reference, rtol=1e-3, atol=1e-6)
    assert model.model.layers[0].mlp.gate.weight.grad.abs().max() > 0


def test_sequence_load_balancing_loss_averages_each_sequence_on_its_own_tokens():
    torch.manual_seed(1)
    logits = torch.randn(11, 8)
    indices = logits.topk(2, dim=-1).indices
    bounds = [0, 4, 5, 11]
    expected = sum(_loop_load_balancing_loss(logits[s:e], indices[s:e])
                   for s, e in zip(bounds[:-1], bounds[1:], strict=True)) / 3
    assert float(sequence_load_balancing_loss(logits, indices, bounds)) == \
        pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--moe-router-load-balancing-type", "global_aux_loss"],
     "global_aux_loss is not supported yet: use aux_loss"),
    (["--moe-router-score-function", "sigmoid"], "takes softmax router probabilities"),
])
def test_load_balancing_losses_the_trainer_lacks_are_refused_at_parse_time(tiny_moe, flags,
                                                                           message):
    argv = train_argv(tiny_moe, "--moe-aux-loss-coeff", "0.01", *flags)
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


# ---- a GRPO run ------------------------------------------------------------------------
def test_grpo_on_the_tiny_moe_runs_stably(tiny_moe, tmp_path):
    """train.py with scripts/models/tiny-moe.sh (checked against its config.json): six
    GRPO rollouts of 8 prompts x 8 samples, random rewards so that every group has a
    gradient. Losses and gradient norms stay finite, the policy's entropy does not
    collapse, the load-balancing loss is logged near even routing, and engine and trainer
    log-probs agree (float32)."""
    argv = model_args("tiny-moe.sh") + train_argv(
        tiny_moe, rm_type="random", num_rollout=6, rollout_batch_size=8,
        n_samples_per_prompt=8, lr="1e-3", run_dir=tmp_path / "run")
    config, _ = load_config(argv)
    assert config.model.moe_aux_loss_coeff == 0.01
    assert cli.main(argv) == 0
    rows = read_metrics(tmp_path / "run/metrics.jsonl")
    steps = [row for row in rows if "train/loss" in row]
    assert len(steps) >= 6
    for row in steps:
        assert math.isfinite(row["train/loss"]) and math.isfinite(row["train/grad_norm"])
        assert 0.9 < row["train/moe_aux_loss"] < 2.0
        assert row["train/train_rollout_logprob_abs_diff"] < 1e-4
    entropy = [row["rollout/entropy"] for row in rows if "rollout/entropy" in row]
    assert len(entropy) == 6 and entropy[-1] > 0.5 * entropy[0]


# ---- data parallel (FSDP2, 2 CPU ranks) -------------------------------------------------
DP_FLAGS = ["--micro-batch-size", "2", "--moe-aux-loss-coeff", "0.1"]


def _dp_worker(rank: int, port: int, tiny_moe: Path, batch, out: Path) -> None:
    torch.set_num_threads(1)
    info = parallel.rank_info(rank, 2, 1, "cpu", master_port=port)
    actor = TrainActor(policy_config(tiny_moe, DP_FLAGS), info, str(tiny_moe / "model"), 2)
    experts = actor.policy.hf_model.model.layers[0].mlp.experts.gate_up_proj
    local_experts = experts.to_local().shape[0] if isinstance(experts, DTensor) else None
    log_probs, _ = actor.compute_log_probs(batch)
    metrics, grads = step_gradients(actor, batch)
    if rank == 0:
        torch.save({"log_probs": log_probs, "metrics": metrics, "grads": grads,
                    "local_experts": local_experts}, out / "results.pt")


def test_two_data_parallel_ranks_train_the_moe_as_one_process(tiny_moe, tmp_path):
    """FSDP2 over 2 gloo ranks shards the expert tensors like any parameter: the step's
    loss, load-balancing loss, gradients (experts and routers included) and log-probs
    equal one process's (each rank's micro-batches are the same samples as there)."""
    reference = TrainActor(policy_config(tiny_moe, DP_FLAGS), RankInfo(),
                           str(tiny_moe / "model"), 2)
    batch = trainer_batch(reference, 12, seed=6)
    expected_log_probs, _ = reference.compute_log_probs(batch)
    expected, expected_grads = step_gradients(reference, batch)
    mp.spawn(_dp_worker, args=(free_port(), tiny_moe, batch, tmp_path), nprocs=2)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    for name in ("train/loss", "train/moe_aux_loss", "train/grad_norm"):
        assert results["metrics"][name] == pytest.approx(expected[name], rel=1e-5), name
    assert results["local_experts"] == 4  # each rank holds half of the 8 experts' rows
    assert "model.layers.0.mlp.experts.gate_up_proj" in results["grads"]
    for name, grad in results["grads"].items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7)
    for values, reference_values in zip(results["log_probs"], expected_log_probs, strict=True):
        torch.testing.assert_close(values, reference_values, rtol=0, atol=1e-5)


def test_a_frozen_router_keeps_its_weights_while_the_experts_train(tiny_moe, tiny):
    actor = TrainActor(policy_config(tiny_moe, ["--moe-router-freeze-gate"]), RankInfo(),
                       str(tiny_moe / "model"), 2)
    batch = trainer_batch(actor, 8, seed=3)
    layer = actor.policy.hf_model.model.layers[0].mlp
    router, experts = layer.gate.weight.detach().clone(), layer.experts.down_proj.detach().clone()
    actor.train(batch)
    assert torch.equal(layer.gate.weight, router)
    assert not torch.equal(layer.experts.down_proj, experts)
    with pytest.raises(ValueError, match="--moe-router-freeze-gate: Qwen3ForCausalLM has no MoE"):
        TrainActor(policy_config(tiny, ["--moe-router-freeze-gate"]), RankInfo(),
                   str(tiny / "model"), 2)


# ---- weight sync by the checkpoint's names ----------------------------------------------
def _saved_tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_pushed_names_are_the_checkpoints_and_engines_load_them(tiny_moe):
    """SGLang loads MoE experts one by one, under the checkpoint's names: the push splits
    the fused expert parameters the way save_pretrained does, and furlong's engines copy
    each part back into its slice."""
    source = load_hf_model(str(tiny_moe / "model"))
    pushed = dict(checkpoint_named_tensors(source, source.named_parameters()))
    saved = _saved_tensors(tiny_moe / "model")
    assert pushed.keys() == saved.keys()
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in pushed
    assert all(torch.equal(pushed[name], saved[name]) for name in saved)
    engine = HFEngine(load_hf_model(str(tiny_moe / "model")), AutoTokenizer.from_pretrained(
        tiny_moe / "model"))
    with torch.no_grad():
        for param in engine.model.parameters():
            param.zero_()
    asyncio.run(engine.update_weights(pushed.items(), version=3))
    received = dict(engine.model.named_parameters())
    for name, param in source.named_parameters():
        assert torch.equal(received[name], param), name
    with pytest.raises(ValueError, match="experts.2.down_proj.weight' has shape"):
        load_named_tensors(engine.model, [("model.layers.0.mlp.experts.2.down_proj.weight",
                                           torch.zeros(3, 3))])


def test_dense_names_pass_unchanged(tiny):
    model = load_hf_model(str(tiny / "model"))
    names = [name for name, _ in checkpoint_named_tensors(model, model.named_parameters())]
    assert names == [name for name, _ in model.named_parameters()]


def test_the_trainer_pushes_the_checkpoints_names(tiny_moe):
    class RecordingEngine:
        async def update_weights(self, named_tensors, version):
            self.names = [name for name, _ in named_tensors]
    actor = TrainActor(policy_config(tiny_moe, []), RankInfo(), str(tiny_moe / "model"), 2)
    engine = RecordingEngine()
    asyncio.run(actor.push_weights(engine, version=1))
    assert sorted(engine.names) == sorted(_saved_names(tiny_moe / "model"))
