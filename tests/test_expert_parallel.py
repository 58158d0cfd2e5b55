"""Expert parallelism on the tiny MoE (8 experts, top-2) gives the numbers of one process,
and is in effect.

One spawn of four CPU ranks (gloo) runs every layout: EP=2 over 4 data-parallel ranks
(two expert groups, each expert slice FSDP-sharded over the 2 ranks that hold it),
EP=4 (one group), tensor parallel 2 x EP=2 with sequence parallel and full
recomputation, and tensor parallel 2 x EP=4 with sequence parallel (Megatron's layout
of Miles' Qwen3-30B-A3B script: the expert group takes the tensor-parallel ranks too,
each running the MoE block on its sequence slice); and dp 2 x context parallel 2
(each rank routes its part of the row), without and with EP=2 (expert slices
FSDP-sharded over the context-parallel ranks that hold them); expert groups across
context-parallel ranks (cp 4 x EP=2), and across context- and tensor-parallel ones
(cp 2 x tp 2 x EP=4, with routing replay); two pipeline stages of one
MoE layer each (pp 2 x dp 2), with EP=2 inside each stage, with context parallel 2 and
routing replay, and with tensor parallel 2 x EP=2 (groups across each stage's
tensor-parallel ranks) and routing replay; on a 4-layer copy, virtual stages with full
recomputation. The
layouts whose routers see part of a row also run --use-routing-replay. The reference is
the plain one-process trainer. Equality alone would also hold with expert parallelism
quietly off, so the ranks also record which experts each
holds and how many routed tokens each sends to other ranks. Last, an EP=2 actor trains
a step and saves; an EP=4 actor loads that checkpoint. Tolerances as in test_parallel
(float32; gradients to 1e-5 relative plus 1e-5 of the largest entry, measured up to
7e-7 of it on the experts); gathered weights bit-exact.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock
from torch.distributed.tensor import DTensor, Shard

from furlong.cluster.placement import plan_placement
from furlong.config import ConfigError
from furlong.model.loading import checkpoint_named_tensors, load_hf_model
from furlong.ports import free_port
from furlong.train import expert_parallel, parallel
from furlong.train.actor import RankInfo, TrainActor

from conftest import policy_config, trainer_batch
from test_parallel import (assert_matches_one_process, assert_same_step, cpu_weights,
                           step_gradients)
from test_pipeline_parallel import pipelined_step_gradients, write_deep

WORLD = 4
NUM_EXPERTS = 8
# One sample per micro-batch on every layout: each micro-batch's load-balancing loss is
# then over the same tokens as in the one-process reference.
FLAGS = ["--micro-batch-size", "1", "--moe-aux-loss-coeff", "0.1"]
# name -> (tensor-parallel size, expert-parallel size, extra flags)
RUNS = {
    "ep2": (1, 2, []),
    "ep4": (1, 4, []),
    "tp2_ep2_sp": (2, 2, ["--sequence-parallel", "--recompute-granularity", "full",
                          "--recompute-method", "uniform"]),
    "tp2_ep4_sp": (2, 4, ["--sequence-parallel"]),
    "tp2_ep4_sp_replay": (2, 4, ["--sequence-parallel", "--use-routing-replay"]),
    "dp2_cp2": (1, 1, ["--context-parallel-size", "2"]),
    "dp2_cp2_replay": (1, 1, ["--context-parallel-size", "2", "--use-routing-replay"]),
    "dp2_cp2_ep2": (1, 2, ["--context-parallel-size", "2"]),
    # Expert groups across context-parallel ranks (each routes its part of the row), and
    # across context- and tensor-parallel ones (a sequence slice of the part; Megatron's
    # layout of Miles' Qwen3-235B-A22B script: tp 4, cp 2, ep 8).
    "cp4_ep2": (1, 2, ["--context-parallel-size", "4"]),
    "cp2_tp2_ep4_sp_replay": (2, 4, ["--context-parallel-size", "2", "--sequence-parallel",
                                     "--use-routing-replay"]),
    # Two pipeline stages of one MoE layer each: the load-balancing term of each stage's
    # layers reaches the loss through what the stage sends; routes recorded on each
    # stage's layers (and context-parallel parts) come back whole.
    "pp2": (1, 1, ["--pipeline-model-parallel-size", "2"]),
    "pp2_ep2": (1, 2, ["--pipeline-model-parallel-size", "2"]),
    "pp2_cp2_replay": (1, 1, ["--pipeline-model-parallel-size", "2", "--context-parallel-size",
                              "2", "--use-routing-replay"]),
    # Full recomputation replays in each backward the routes of its own micro-batch,
    # though the schedule ran other micro-batches' forwards in between.
    "pp2_recompute_replay": (1, 1, ["--pipeline-model-parallel-size", "2",
                                    "--recompute-granularity", "full", "--recompute-method",
                                    "uniform", "--use-routing-replay"]),
    "pp2_tp2_ep2_sp_replay": (2, 2, ["--pipeline-model-parallel-size", "2", "--sequence-parallel",
                                     "--use-routing-replay"]),
}
# On a 4-layer copy: virtual stages (each rank two chunks of one MoE layer) with full
# recomputation, whose backward re-records the routes of one chunk between forwards of
# the other.
DEEP_RUN = (1, 1, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                   "1", "--recompute-granularity", "full", "--recompute-method", "uniform"])
EXPERT_RUNS = [name for name, (_, ep, _) in RUNS.items() if ep > 1]
REPLAY_RUNS = [name for name in RUNS if name.endswith("_replay")]
METRICS = ("train/loss", "train/pg_loss", "train/kl_loss", "train/moe_aux_loss",
           "train/grad_norm")
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
ROUTER = "model.layers.0.mlp.gate.weight"


def flags_of(tp: int, ep: int, extra: list[str]) -> list[str]:
    return [*FLAGS, "--tensor-model-parallel-size", str(tp),
            "--expert-model-parallel-size", str(ep), *extra]


def size_of(extra: list[str], flag: str) -> int:
    return int(extra[extra.index(flag) + 1]) if flag in extra else 1


# ---- the ranks --------------------------------------------------------------------------
def _worker(rank: int, port: int, tiny_moe: Path, deep_moe: Path, batch, out: Path) -> None:
    torch.set_num_threads(1)
    results = {}

    def actor_for(tp: int, ep: int, extra: list[str], init: Path,
                  root: Path = tiny_moe) -> TrainActor:
        info = parallel.rank_info(rank, WORLD, tp, "cpu", master_port=port,
                                  cp_size=size_of(extra, "--context-parallel-size"),
                                  pp_size=size_of(extra, "--pipeline-model-parallel-size"))
        return TrainActor(policy_config(root, flags_of(tp, ep, extra)), info, str(init), 2)

    deep = actor_for(*DEEP_RUN, deep_moe / "model", root=deep_moe)
    results["deep"] = (deep.compute_log_probs(batch)[0], *pipelined_step_gradients(deep, batch))

    for name, (tp, ep, extra) in RUNS.items():
        actor = actor_for(tp, ep, extra, tiny_moe / "model")
        results[f"{name}/weights"] = cpu_weights(actor)
        role = actor.policy.pipeline
        with held_experts(actor, ep > 1) as held, tokens_sent_away() as sent:
            results[f"{name}/log_probs"] = actor.compute_log_probs(batch)[0]
            results[f"{name}/recorded_routes"] = actor.recorded_routes
            # (replaying the routes, if recorded)
            results[name] = step_gradients(actor, batch) if role is None \
                else pipelined_step_gradients(actor, batch)
        if ep > 1:
            results[f"{name}/layout"] = {"held": held[0], "sent": sum(sent),
                                         "layer": 0 if role is None else role.layers[0],
                                         **stored_shards(actor)}
    results["checkpoint"] = _save_under_ep2_resume_under_ep4(actor_for, batch,
                                                             tiny_moe / "model", out / "checkpoint")
    gathered = [None] * WORLD  # the per-rank layouts, for rank 0 to write
    dist.all_gather_object(gathered, {k: v for k, v in results.items() if "layout" in k})
    if rank == 0:
        torch.save({**results, "layouts": gathered}, out / "results.pt")


def _save_under_ep2_resume_under_ep4(actor_for, batch, init: Path, directory: Path) -> dict:
    """An EP=2 actor trains a step, saves, and trains another; an EP=4 actor starts from
    the save, restores its optimizer state and takes that second step."""
    flags = ["--lr", "1e-3"]
    actor = actor_for(1, 2, flags, init)
    actor.train(batch)
    directory.mkdir(parents=True, exist_ok=True)
    actor.save(directory, save_optimizer=True)
    saved = cpu_weights(actor)
    (next_step,) = actor.train(batch)
    resumed = actor_for(1, 4, flags, directory)
    loaded, log_probs = cpu_weights(resumed), resumed.compute_log_probs(batch)[0]
    resumed.restore(directory)
    (resumed_step,) = resumed.train(batch)
    return {"saved": saved, "loaded": loaded, "log_probs": log_probs, "next": next_step,
            "next_weights": cpu_weights(actor), "resumed": resumed_step,
            "resumed_weights": cpu_weights(resumed)}


@contextmanager
def held_experts(actor: TrainActor, split: bool):
    """The first MoE layer's gate_up_proj as its forwards compute with it (FSDP has
    gathered it over "edp"): this rank's experts, one tensor per forward (`split`: the
    experts are split over ranks; else nothing is recorded)."""
    seen = []
    if not split:
        yield seen
        return
    experts = actor.policy.hf_model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(
        lambda module, args: seen.append(module.gate_up_proj.to_local().detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def tokens_sent_away():
    """Rows this rank sends to other ranks of its expert group, per token exchange."""
    sent = []
    original = expert_parallel.all_to_all_single_autograd

    def recorded(rows, output_splits, input_splits, group):
        me = dist.get_rank(group)
        sent.append(sum(n for peer, n in enumerate(input_splits) if peer != me))
        return original(rows, output_splits, input_splits, group)
    expert_parallel.all_to_all_single_autograd = recorded
    try:
        yield sent
    finally:
        expert_parallel.all_to_all_single_autograd = original


def stored_shards(actor: TrainActor) -> dict:
    """How this rank stores an expert tensor and a router: placement per mesh dimension
    and the local shape."""
    params = dict(actor.policy.hf_model.named_parameters())
    layout = {}
    for name in (EXPERTS, ROUTER):
        param = params[name]
        assert isinstance(param, DTensor), name
        layout[name] = {"placements": dict(zip(param.device_mesh.mesh_dim_names,
                                               param.placements, strict=True)),
                        "local_shape": tuple(param.to_local().shape)}
    return layout


# ---- the checks ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_moe(tiny_moe, tmp_path_factory) -> Path:
    return write_deep(tiny_moe, tmp_path_factory.mktemp("deep_moe"))


@pytest.fixture(scope="module")
def ranks(tiny_moe, deep_moe, tmp_path_factory):
    """(batch, one-process reference actor, results of the 4-rank spawn, its output
    directory). The spawn runs once per session: under pytest-xdist the first worker to
    get here runs it and the others read its results (the inputs are seeded, so equal)."""
    reference = TrainActor(policy_config(tiny_moe, FLAGS), RankInfo(),
                           str(tiny_moe / "model"), 2)
    batch = trainer_batch(reference, 8, seed=6)
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "expert_parallel"
    with FileLock(f"{out}.lock"):
        if not (out / "results.pt").is_file():
            out.mkdir(exist_ok=True)
            mp.spawn(_worker, args=(free_port(), tiny_moe, deep_moe, batch, out),
                     nprocs=WORLD)
    return batch, reference, torch.load(out / "results.pt", weights_only=True), out


@pytest.fixture(scope="module")
def one_process(ranks):
    """Log-probs, step metrics and gradients of the one-process trainer (EP=1)."""
    batch, reference, _, _ = ranks
    log_probs, _ = reference.compute_log_probs(batch)
    return log_probs, *step_gradients(reference, batch)


@pytest.mark.parametrize("name", list(RUNS))
def test_step_and_log_probs_equal_one_process(ranks, one_process, name):
    """Loss terms (load-balancing loss included), the global gradient norm, every
    gradient (experts and routers gathered back whole) and every log-prob equal EP=1's."""
    results = ranks[2]
    metrics, grads = results[name]
    assert_matches_one_process(metrics, grads, results[f"{name}/log_probs"], one_process,
                               METRICS)


def test_virtual_stages_with_recomputation_equal_one_process(deep_moe, ranks):
    """Each chunk's load-balancing term is over its own layers' routes, not those its
    rank's other chunk recorded again in a recomputing backward."""
    batch = ranks[0]
    reference = TrainActor(policy_config(deep_moe, FLAGS), RankInfo(), str(deep_moe / "model"), 2)
    log_probs, metrics, grads = ranks[2]["deep"]
    expected_log_probs = reference.compute_log_probs(batch)[0]
    expected_metrics, expected_grads = step_gradients(reference, batch)
    assert_matches_one_process(metrics, dict(sorted(grads.items())), log_probs, (
        expected_log_probs, expected_metrics, dict(sorted(expected_grads.items()))), METRICS)


@pytest.mark.parametrize("name", REPLAY_RUNS)
def test_routes_recorded_on_parts_of_a_row_come_back_whole(tiny_moe, ranks, name):
    """--use-routing-replay where each rank's routers see part of a row (its sequence
    slice, its context-parallel part): the routes come back as the whole row's, those of
    one process (and the steps that replay them matched one process above)."""
    batch, _, results, _ = ranks
    reference = TrainActor(policy_config(tiny_moe, [*FLAGS, "--use-routing-replay"]),
                           RankInfo(), str(tiny_moe / "model"), 2)
    reference.compute_log_probs(batch)
    recorded = results[f"{name}/recorded_routes"]
    assert len(recorded) == len(batch.tokens)
    for got, expected in zip(recorded, reference.recorded_routes, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name", EXPERT_RUNS)
def test_each_rank_holds_its_experts_only(tiny_moe, ranks, name):
    """Rank r of an expert group of E computes with experts [r 8/E, (r+1) 8/E) and no
    other (their rows of the checkpoint, exactly); it stores them as a DTensor sharded
    over "ep" (and by FSDP over "edp"), so its memory holds 8/(dp) expert rows, 8/(dp
    tp) when the groups take tensor-parallel ranks; the router stays FSDP-sharded over
    all data-parallel ranks."""
    tp, ep, extra = RUNS[name]
    cp = size_of(extra, "--context-parallel-size")
    pp = size_of(extra, "--pipeline-model-parallel-size")
    params = dict(load_hf_model(str(tiny_moe / "model")).named_parameters())
    per_rank = NUM_EXPERTS // ep
    stage_world = WORLD // pp
    dp = stage_world // (tp * cp)
    across_tp = dp % ep != 0  # groups of adjacent ranks, tensor-parallel ones included
    for rank, layouts in enumerate(ranks[2]["layouts"]):
        layout = layouts[f"{name}/layout"]  # (EXPERTS, ROUTER: the rank's first MoE layer)
        full = params[EXPERTS.replace(".0.", f".{layout['layer']}.")].detach()
        assert layout["layer"] == rank // stage_world
        stage_rank = rank % stage_world
        group_rank = stage_rank % ep if across_tp else (stage_rank // (tp * cp)) % ep
        assert torch.equal(layout["held"], full[group_rank * per_rank:(group_rank + 1) * per_rank])
        stored = layout[EXPERTS]
        assert stored["placements"]["ep"] == Shard(0)
        holders = stage_world if across_tp else dp * cp  # ranks sharing the router's shards
        assert stored["local_shape"] == (NUM_EXPERTS // holders, *full.shape[1:])
        assert layout[ROUTER]["placements"] == {"dp_cp" if cp > 1 else "dp": Shard(0)}
        assert layout[ROUTER]["local_shape"][0] == NUM_EXPERTS // (dp * cp)


@pytest.mark.parametrize("name", EXPERT_RUNS)
def test_routed_tokens_cross_ranks(ranks, name):
    """Every rank sends some of its routed tokens to the other ranks of its group."""
    for layouts in ranks[2]["layouts"]:
        assert layouts[f"{name}/layout"]["sent"] > 0


def test_full_weights_are_the_checkpoint(tiny_moe, ranks):
    """Gathered weights (what checkpoints and weight pushes see) are the HF tensors, by
    the checkpoint's names, under every layout."""
    model = load_hf_model(str(tiny_moe / "model"))
    expected = dict(checkpoint_named_tensors(model, model.named_parameters()))
    for name in RUNS:
        weights = ranks[2][f"{name}/weights"]
        assert list(weights) == list(expected)
        for key, tensor in weights.items():
            assert torch.equal(tensor, expected[key].detach()), (name, key)


def test_a_checkpoint_saved_under_ep2_resumes_under_ep4(tiny_moe, ranks):
    """The trained weights saved by EP=2 come back exactly under EP=4, which computes one
    process's log-probs from them; with the optimizer state (whole tensors by name) the
    EP=4 actor takes the step the EP=2 one took next, Adam's moments included."""
    batch, _, results, out = ranks
    checkpoint = results["checkpoint"]
    model = load_hf_model(str(tiny_moe / "model"))
    initial = dict(checkpoint_named_tensors(model, model.named_parameters()))
    expert = "model.layers.0.mlp.experts.0.gate_proj.weight"  # a checkpoint name
    assert not torch.equal(checkpoint["saved"][expert], initial[expert])
    for key, tensor in checkpoint["loaded"].items():
        assert torch.equal(tensor, checkpoint["saved"][key]), key
    from_save = TrainActor(policy_config(tiny_moe, FLAGS), RankInfo(), str(out / "checkpoint"), 1)
    expected, _ = from_save.compute_log_probs(batch)
    for actual, values in zip(checkpoint["log_probs"], expected, strict=True):
        torch.testing.assert_close(actual, values, rtol=1e-5, atol=1e-6)
    assert_same_step(checkpoint["resumed"], checkpoint["resumed_weights"], checkpoint["next"],
                     checkpoint["next_weights"], METRICS)


def test_expert_parallel_size_must_divide_the_trainer_ranks(tiny_moe):
    with pytest.raises(ValueError, match="--expert-model-parallel-size 2 does not divide the 1"):
        TrainActor(policy_config(tiny_moe, ["--expert-model-parallel-size", "2"]), RankInfo(),
                   str(tiny_moe / "model"), 1)


ACROSS_TP = ["--actor-num-gpus-per-node", "4", "--colocate", "--tensor-model-parallel-size", "2",
             "--expert-model-parallel-size", "4"]
SPANNING = "--expert-model-parallel-size 4 over 2 data-parallel ranks x " \
    "--tensor-model-parallel-size 2"


@pytest.mark.parametrize("flags, words", [
    (["--expert-model-parallel-size", "2"], ["--expert-model-parallel-size 2", "one process"]),
    (["--actor-num-gpus-per-node", "4", "--colocate", "--tensor-model-parallel-size", "2",
      "--expert-model-parallel-size", "3"],
     ["--expert-model-parallel-size 3 does not divide the 4 trainer ranks"]),
    (ACROSS_TP, [SPANNING, "add --sequence-parallel"]),
])
def test_placement_refuses_expert_groups_that_do_not_tile_the_ranks(tiny_moe, flags, words):
    """Caught before any weight loads (and by --dry-run)."""
    with pytest.raises(ConfigError) as info:
        plan_placement(policy_config(tiny_moe, flags), 0)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("flags", [
    ["--expert-model-parallel-size", "2"],
    [*ACROSS_TP[3:], "--sequence-parallel"],  # expert groups across a stage's tp ranks
])
def test_placement_takes_pipeline_stages_of_an_moe_model(tiny_moe, flags):
    layout = ["--actor-num-gpus-per-node", "8", "--colocate", "--pipeline-model-parallel-size",
              "2"]
    assert plan_placement(policy_config(tiny_moe, [*layout, *flags]), 0).trainer_ranks == 8
