"""LoRA over two CPU ranks (gloo): data parallel (FSDP2), tensor parallel (with and
without sequence parallel), context parallel, two pipeline stages and, on the tiny MoE,
expert parallel give one process's numbers, and the split is in effect.

One spawn runs every layout. Per layout: where some adapter and base weights live (mesh
placements and local shapes), the adapter gathered whole before training (bit-equal to
one process: every rank draws A from the same seed), the policy's and the reference's
log-probs, and the metrics and full adapter gradients of one step. A third check runs a
bfloat16 base with float32 adapters in the same FSDP2 units (mixed precision on the CPU).
Tolerances as tests/test_parallel.py's (float32): metrics 1e-5 relative, gradients 1e-5
relative plus 1e-5 of the largest entry, log-probs 1e-5.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Replicate, Shard

from furlong.model import lora
from furlong.model.loading import load_hf_model
from furlong.ports import free_port
from furlong.train import distributed_state, parallel
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import pack
from furlong.train.policy import CausalLMPolicy

from conftest import policy_config, random_batch, trainer_batch

WORLD = 2
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--target-modules", "all-linear",
        "--micro-batch-size", "3"]
RUNS = {"dp": [], "tp": ["--tensor-model-parallel-size", "2"],
        "tp_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "cp": ["--context-parallel-size", "2"],
        "pp": ["--pipeline-model-parallel-size", "2"],
        "moe_ep": ["--expert-model-parallel-size", "2"]}  # name -> flags (moe_: the tiny MoE)
METRICS = ("train/loss", "train/pg_loss", "train/kl_loss", "train/entropy_loss",
           "train/grad_norm")
LAYOUT = ("model.layers.0.self_attn.q_proj.base_layer.weight",
          "model.layers.0.self_attn.q_proj.lora_A.default.weight",
          "model.layers.0.self_attn.q_proj.lora_B.default.weight",
          "model.layers.0.mlp.down_proj.base_layer.weight",
          "model.layers.0.mlp.down_proj.lora_A.default.weight",
          "model.layers.0.mlp.down_proj.lora_B.default.weight",
          "model.layers.0.mlp.experts.gate_up_proj")  # (the tiny MoE's 8 experts)


def make_batch(tiny):
    """6 samples with advantages, reference log-probs and old log-probs of the base, from
    one process; a B that is not zero, so that every adapter gradient is."""
    torch.manual_seed(0)
    actor = TrainActor(policy_config(tiny, []), RankInfo(), str(tiny / "model"), 1)
    batch = trainer_batch(actor, 6, seed=5)
    batch.old_log_probs, _ = actor.compute_log_probs(batch)
    return batch


def nonzero_b(actor: TrainActor) -> None:
    """Give every lora_B values seeded by its name in the whole model (the same on every
    rank, whatever its shard or stage)."""
    with torch.no_grad():
        for name, param in actor.policy.hf_model.named_parameters():
            if ".lora_B." in name:
                seed = zlib.crc32(global_name(actor, name).encode())
                generator = torch.Generator().manual_seed(seed)
                whole = 0.05 * torch.randn(param.shape, generator=generator)
                if isinstance(param, DTensor):
                    whole = torch.distributed.tensor.distribute_tensor(
                        whole, param.device_mesh, param.placements, src_data_rank=None)
                param.copy_(whole)


def global_name(actor: TrainActor, name: str) -> str:
    """A parameter's name in the whole model (a pipeline stage renumbers its layers)."""
    role = actor.policy.pipeline
    return role.global_name(name) if role else name


def every_rank(actor: TrainActor, mine: dict) -> dict:
    """The union of every rank's `mine` (pipeline stages hold different parameters)."""
    if actor.rank.pp_size == 1:
        return mine
    parts = [None] * WORLD
    dist.all_gather_object(parts, mine)
    return {key: value for part in parts for key, value in part.items()}


def step(actor: TrainActor, batch) -> tuple[dict, dict]:
    """Metrics and full adapter gradients of one step (the update skipped)."""
    grads = {}

    def capture():
        grads.update(every_rank(actor, {
            global_name(actor, name): distributed_state.full_tensor(param.grad).cpu().clone()
            for name, param in actor.policy.hf_model.named_parameters()
            if lora.is_adapter_name(name)}))
        norm = distributed_state.clip_grad_norm_(actor._optimized_parameters(), float("inf"),
                                                 actor.rank.pp_size)
        actor.optimizer.zero_grad()
        return norm

    actor._optimizer_step = capture
    (metrics,) = actor.train(batch)
    return metrics, grads


def layout(actor: TrainActor) -> dict:
    held = {}
    for name, param in actor.policy.hf_model.named_parameters():
        if name in LAYOUT:
            placements = dict(zip(param.device_mesh.mesh_dim_names, param.placements,
                                  strict=True)) if isinstance(param, DTensor) else {}
            local = param.to_local() if isinstance(param, DTensor) else param
            held[name] = {"placements": placements, "local": local.detach().clone()}
    return held


def measure(actor: TrainActor, batch) -> dict:
    adapter = {name: tensor.cpu().clone() for name, tensor in actor.named_adapter_weights()}
    nonzero_b(actor)
    trained = sorted(every_rank(actor, {
        global_name(actor, name): True for group in actor.optimizer.param_groups
        for name, param in actor.policy.hf_model.named_parameters()
        if any(param is p for p in group["params"])}))
    held = every_rank(actor, {global_name(actor, name).split(".")[2]: actor.rank.rank
                              for name, _ in actor.policy.hf_model.named_parameters()
                              if lora.is_adapter_name(name)})
    return {"adapter": adapter, "layout": layout(actor), "trained": trained, "held": held,
            "log_probs": actor.compute_log_probs(batch)[0],
            "reference": actor.compute_log_probs(batch, reference=True)[0],
            "step": step(actor, batch)}


def mixed_precision_step(tiny, mesh) -> dict:
    """A bfloat16 base and float32 adapters in one FSDP2 unit per layer, bfloat16 compute
    (FSDP2's mixed precision, as on GPUs): one forward and backward; each weight's dtype,
    its gradient's and whether it trains."""
    hf_model = load_hf_model(str(tiny / "model"), torch.bfloat16, packed=True)
    lora.attach(hf_model, lora.LoraSpec(4, 8), seed=0)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if ".lora_B." in name:
                param.fill_(0.01)  # so that A gets a gradient too
    policy = CausalLMPolicy(hf_model)
    parallel.apply_fully_shard(policy, parallel.decoder_layers(hf_model), mesh["dp"],
                               mixed_precision=True)
    micro = pack(random_batch(2, hf_model.config.vocab_size, seed=1), [0, 1], "cpu")
    log_probs, _ = policy(micro)
    log_probs.sum().backward()
    return {name: (param.dtype, param.grad is not None and param.grad.dtype,
                   param.requires_grad)
            for name, param in hf_model.named_parameters() if name in LAYOUT}


def _worker(rank: int, port: int, tiny, tiny_moe, batch, out) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, flags in RUNS.items():
        model = tiny_moe if name.startswith("moe_") else tiny
        tp, cp, pp = (2 if flag in flags else 1 for flag in (
            "--tensor-model-parallel-size", "--context-parallel-size",
            "--pipeline-model-parallel-size"))
        info = parallel.rank_info(rank, WORLD, tp, "cpu", master_port=port, cp_size=cp,
                                  pp_size=pp)
        extra = [*LORA, *flags]
        torch.manual_seed(0)
        actor = TrainActor(policy_config(model, extra), info, str(model / "model"), 1)
        results[name] = measure(actor, batch)
        if name == "dp":
            results["mixed"] = mixed_precision_step(tiny, actor.mesh)
        if name == "pp":  # each stage's adapters into one PEFT adapter
            (out / "pp_save").mkdir(exist_ok=True)
            actor.save(out / "pp_save", save_optimizer=True)
    # A rank without gradients (a pipeline stage whose layers hold no adapter) still joins
    # the gradient norm's all-reduce: a plain gradient counts as held by both ranks.
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.full((3,), 2.0)
    results["norm"] = distributed_state.clip_grad_norm_([weight] if rank == 0 else [],
                                                        float("inf"))
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tiny, tiny_moe, tmp_path_factory):
    """(each rank's results, one process's results of the dense and the MoE model, the
    spawn's output directory, the batch)."""
    batch = make_batch(tiny)
    out = tmp_path_factory.mktemp("lora_parallel")
    mp.spawn(_worker, args=(free_port(), tiny, tiny_moe, batch, out), nprocs=WORLD)
    expected = {}
    for kind, model in (("dense", tiny), ("moe", tiny_moe)):
        torch.manual_seed(0)
        one = TrainActor(policy_config(model, LORA), RankInfo(), str(model / "model"), 1)
        expected[kind] = measure(one, batch)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)], \
        expected, out, batch


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(RUNS))
def test_lora_step_equals_one_process(ranks, name):
    results, expected, _, _ = ranks
    got, expected = results[0][name], expected["moe" if name.startswith("moe_") else "dense"]
    assert got["trained"] == expected["trained"] == sorted(
        n for n in got["trained"] if lora.is_adapter_name(n))  # the norms stay frozen
    for key, tensor in expected["adapter"].items():  # the same seeded A, gathered whole
        assert torch.equal(got["adapter"][key], tensor), key
    for actual, want in zip(got["log_probs"] + got["reference"],
                            expected["log_probs"] + expected["reference"], strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-5)
    metrics, grads = got["step"]
    want_metrics, want_grads = expected["step"]
    for key in METRICS:
        assert metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-7), key
    assert list(grads) == list(want_grads)
    for key, grad in grads.items():
        assert grad.abs().sum() > 0, key
        assert_close_relative(grad, want_grads[key])


@pytest.mark.parametrize("run", ["tp", "tp_sp"])
def test_tensor_parallel_splits_base_and_one_adapter_matrix(ranks, run):
    """Column-parallel q_proj: base and B split by output rows, A whole (and equal on both
    ranks); row-parallel down_proj: base and A split by input columns, B whole (with
    sequence parallelism too: it runs on each rank's slice of the sequence)."""
    results, expected, _, _ = ranks
    full = {name: held["local"] for name, held in expected["dense"]["layout"].items()}
    split = {"q_proj.base_layer": Shard(0), "q_proj.lora_B": Shard(0),
             "down_proj.base_layer": Shard(1), "down_proj.lora_A": Shard(1)}
    for name in full:
        held = [results[r][run]["layout"][name] for r in range(WORLD)]
        dim = next((p.dim for key, p in split.items() if key in name), None)
        if dim is None:  # whole over "tp": the same values on both ranks
            assert held[0]["placements"].get("tp", Replicate()) == Replicate(), name
            assert torch.equal(held[0]["local"], held[1]["local"]), name
            continue
        assert held[0]["placements"]["tp"] == Shard(dim), name
        halves = [h["local"] for h in held]
        assert halves[0].shape[dim] == full[name].shape[dim] // 2, name
        assert torch.equal(torch.cat(halves, dim), full[name]), name


@pytest.mark.parametrize("run, mesh", [("dp", "dp"), ("cp", "dp_cp")])
def test_data_and_context_parallel_ranks_shard_adapters_and_base(ranks, run, mesh):
    """FSDP2 over the data-parallel ranks, or over data x context-parallel ones (whose
    ranks hold the same weights and see other tokens)."""
    assert set(ranks[0][0][run]["held"]) == {"0", "1"}  # every layer's adapters
    for name, held in ranks[0][0][run]["layout"].items():
        assert held["placements"] == {mesh: Shard(0)}, name


def test_bf16_base_and_fp32_adapters_share_an_fsdp2_unit(ranks):
    for name, (dtype, grad_dtype, requires_grad) in ranks[0][0]["mixed"].items():
        if lora.is_adapter_name(name):
            assert (dtype, grad_dtype, requires_grad) == (torch.float32, torch.float32, True)
        else:
            assert (dtype, grad_dtype, requires_grad) == (torch.bfloat16, False, False), name


def test_pipeline_stages_hold_their_layers_adapters_and_save_one_adapter(tiny, ranks):
    """Rank 0 (stage 0) holds layer 0's adapters, rank 1 layer 1's; a save gathers them
    into one PEFT adapter, from which one process computes the stages' log-probs."""
    results, _, out, batch = ranks
    assert results[0]["pp"]["held"] == {"0": 0, "1": 1}
    one = TrainActor(policy_config(tiny, [*LORA, "--lora-adapter-path",
                                          str(out / "pp_save" / "adapter")]),
                     RankInfo(), str(tiny / "model"), 1)
    for actual, want in zip(one.compute_log_probs(batch)[0],
                            results[0]["pp"]["log_probs"], strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-5)


def test_expert_parallel_splits_the_frozen_experts(ranks):
    """The MoE's adapters are on attention; its experts, which take none, are split over
    the two expert-parallel ranks (4 of 8 each) and stay frozen."""
    results = ranks[0]
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    held = [results[r]["moe_ep"]["layout"][experts] for r in range(WORLD)]
    for layout in held:
        assert layout["placements"]["ep"] == Shard(0) and layout["local"].shape[0] == 4
    assert not torch.equal(held[0]["local"], held[1]["local"])
    assert not any(".experts." in name for name in results[0]["moe_ep"]["trained"])


def test_a_rank_without_gradients_joins_the_norm(ranks):
    assert [ranks[0][r]["norm"] for r in range(WORLD)] == [pytest.approx(12 ** 0.5 / 2 ** 0.5)] * 2
