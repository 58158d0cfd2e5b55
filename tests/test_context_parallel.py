"""Context parallelism (--context-parallel-size) on the tiny dense model (4 query heads,
2 KV heads) gives the numbers of one process, and is in effect.

One spawn of four CPU ranks (gloo), shared by the xdist workers, runs every layout:
dp2 x cp2 (per-sample loss, fixed micro-batches); cp4 (one data-parallel rank, per-token
loss, dynamic batching: --max-tokens-per-gpu counts one rank's tokens, so its reference
in one process has 4 times the budget; 2 KV heads repeated for 4 ranks); cp2 x tp2 with
sequence parallel and full recomputation (1 KV head per tensor-parallel rank, repeated
for 2 ranks). The batch has samples of 2 and 3 tokens (shorter than C) and packed rows
whose length C does not divide. Equality alone would hold with context parallelism
quietly off, so the ranks record what each forward holds: the tokens entering the
embedding (ceil(T / C) of a row of T), and what the attention core sees after the
all-to-all (the whole padded row, heads / (tp C)). Then a dp2 x cp2 run saves and a
dp4 run (cp1) resumes it, and the other way round; and a context-parallel trainer
pushes its weights into an engine, which serves them. Tolerances as in test_parallel.
"""
from __future__ import annotations

import asyncio
import math
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock
from torch.distributed.tensor import DTensor, Shard

from furlong import cli, dry_run
from furlong.cluster.placement import plan_placement
from furlong.config import ConfigError, load_config
from furlong.engine.hf_engine import HFEngine
from furlong.model import attention
from furlong.model.loading import load_hf_model
from furlong.ports import free_port
from furlong.train import parallel
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.batch import TrainBatch

from conftest import policy_config, random_batch, train_argv
from test_parallel import assert_engine_serves_the_push, assert_matches_one_process, \
    assert_same_step, cpu_weights, prepared_batch, step_gradients

WORLD = 4
HEADS, KV_HEADS = 4, 2
BUDGET = 12  # --max-tokens-per-gpu of the cp4 run
# name -> (tensor-parallel size, context-parallel size, flags, the one-process reference's)
RUNS = {
    "dp2_cp2": (1, 2, ["--micro-batch-size", "3"], ["--micro-batch-size", "3"]),
    "cp4": (1, 4, ["--calculate-per-token-loss", "--use-dynamic-batch-size",
                   "--max-tokens-per-gpu", str(BUDGET)],
            ["--calculate-per-token-loss", "--use-dynamic-batch-size",
             "--max-tokens-per-gpu", str(4 * BUDGET)]),
    "cp2_tp2_sp": (2, 2, ["--micro-batch-size", "3", "--sequence-parallel",
                          "--recompute-granularity", "full", "--recompute-method", "uniform"],
                   ["--micro-batch-size", "3"]),
}
RESUME_FLAGS = ["--lr", "1e-3", "--micro-batch-size", "3"]
EMBEDDING = "model.embed_tokens.weight"
QUERY = "model.layers.0.self_attn.q_proj.weight"


def flags_of(tp: int, cp: int, extra: list[str]) -> list[str]:
    return [*extra, "--tensor-model-parallel-size", str(tp), "--context-parallel-size", str(cp)]


def short_sample_batch(vocab: int) -> TrainBatch:
    """12 random samples, two of them replaced by samples of 2 and 3 tokens."""
    batch = random_batch(12, vocab, seed=5)
    for index, (prompt, response) in ((1, (1, 1)), (6, (1, 2))):
        batch.tokens[index] = batch.tokens[index][:prompt + response]
        batch.response_lengths[index] = response
        batch.loss_masks[index] = torch.ones(response)
    return batch


# ---- the ranks --------------------------------------------------------------------------
def _worker(rank: int, port: int, tiny: Path, batch, out: Path) -> None:
    torch.set_num_threads(1)
    results = {}

    def actor_for(tp: int, cp: int, extra: list[str], init: Path | None = None) -> TrainActor:
        info = parallel.rank_info(rank, WORLD, tp, "cpu", master_port=port, cp_size=cp)
        return TrainActor(policy_config(tiny, flags_of(tp, cp, extra)), info,
                          str(init or tiny / "model"), 3)

    for name, (tp, cp, extra, _) in RUNS.items():
        actor = actor_for(tp, cp, extra)
        results[f"{name}/weights"] = cpu_weights(actor)
        with held_tokens(actor) as held:
            results[f"{name}/log_probs"] = actor.compute_log_probs(batch)[0]
            results[name] = step_gradients(actor, batch)
        results[f"{name}/layout"] = {"held": held, **stored_shards(actor)}
    results["resume"] = _resume_across_layouts(actor_for, batch, out, tiny)
    gathered = [None] * WORLD  # the per-rank layouts, for rank 0 to write
    dist.all_gather_object(gathered, {k: v for k, v in results.items() if "layout" in k})
    if rank == 0:
        torch.save({**results, "layouts": gathered}, out / "results.pt")


def _resume_across_layouts(actor_for, batch, out: Path, tiny: Path) -> dict:
    """dp2 x cp2 trains a step and saves; dp4 (cp1) restores it and takes step 2 as the
    run that did not stop, saves, takes step 3; dp2 x cp2 restores that save and takes
    step 3 again, and pushes its weights into an engine."""
    first = actor_for(1, 2, RESUME_FLAGS)
    first.train(batch)
    save(first, out / "saved_by_cp2")
    (second_step,) = first.train(batch)
    data_parallel = actor_for(1, 1, RESUME_FLAGS, init=out / "saved_by_cp2" / "model")
    data_parallel.restore(out / "saved_by_cp2")
    (resumed_second,) = data_parallel.train(batch)
    resumed_second_weights = cpu_weights(data_parallel)
    save(data_parallel, out / "saved_by_cp1")
    (third_step,) = data_parallel.train(batch)
    context_parallel = actor_for(1, 2, RESUME_FLAGS, init=out / "saved_by_cp1" / "model")
    loaded = cpu_weights(context_parallel)
    context_parallel.restore(out / "saved_by_cp1")
    (resumed_third,) = context_parallel.train(batch)
    return {"second": second_step, "second_weights": cpu_weights(first),
            "resumed_second": resumed_second, "resumed_second_weights": resumed_second_weights,
            "third": third_step, "third_weights": cpu_weights(data_parallel),
            "resumed_third": resumed_third, "resumed_third_weights": cpu_weights(context_parallel),
            "loaded": loaded, "pushed": _push(context_parallel, tiny)}


def save(actor: TrainActor, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    actor.save(directory, save_optimizer=True)


def _push(actor: TrainActor, tiny: Path) -> dict:
    """The weights of `actor` pushed into an HF engine that holds the initial ones: the
    trainer's weights, and what the engine serves after the push."""
    from transformers import AutoTokenizer
    engine = HFEngine(load_hf_model(str(tiny / "model")), AutoTokenizer.from_pretrained(
        tiny / "model"))
    asyncio.run(actor.push_weights(engine, 1))
    return {"trainer": cpu_weights(actor), "version": engine.weight_version,
            "served": {n: t.detach().clone() for n, t in engine.model.named_parameters()}}


@contextmanager
def held_tokens(actor: TrainActor):
    """Per forward: the packed row's length, the tokens this rank embeds, and the shapes
    the attention core of the first layer receives (query rows, query heads, KV heads)."""
    seen = []
    hf_model = actor.policy.hf_model
    core = attention.varlen_causal_attention

    def recorded_core(query, key, *args, **kwargs):
        if seen and "attention" not in seen[-1]:
            seen[-1]["attention"] = (query.shape[0], query.shape[1], key.shape[1])
        return core(query, key, *args, **kwargs)
    handles = [
        actor.policy.register_forward_pre_hook(
            lambda module, args: seen.append({"row": args[0].num_tokens})),
        hf_model.model.embed_tokens.register_forward_pre_hook(
            lambda module, args: seen[-1].update(embedded=args[0].shape[1]))]
    attention.varlen_causal_attention = recorded_core
    try:
        yield seen
    finally:
        attention.varlen_causal_attention = core
        for handle in handles:
            handle.remove()


def stored_shards(actor: TrainActor) -> dict:
    params = dict(actor.policy.hf_model.named_parameters())
    return {name: {"placements": dict(zip(params[name].device_mesh.mesh_dim_names,
                                          params[name].placements, strict=True)),
                   "local_shape": tuple(params[name].to_local().shape)}
            for name in (EMBEDDING, QUERY) if isinstance(params[name], DTensor)}


# ---- the checks ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    """(batch, results of the 4-rank spawn, its output directory). The spawn runs once per
    session: under pytest-xdist the first worker here runs it, the others read its
    results (the inputs are seeded, so equal)."""
    batch = prepared_batch(tiny, short_sample_batch)
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "context_parallel"
    with FileLock(f"{out}.lock"):
        if not (out / "results.pt").is_file():
            out.mkdir(exist_ok=True)
            mp.spawn(_worker, args=(free_port(), tiny, batch, out), nprocs=WORLD)
    return batch, torch.load(out / "results.pt", weights_only=True), out


@pytest.fixture(scope="module")
def one_process(tiny, ranks):
    """name -> (log-probs, step metrics, gradients) of each run's one-process reference."""
    batch = ranks[0]
    expected = {}
    for name, (_, _, _, reference_flags) in RUNS.items():
        reference = TrainActor(policy_config(tiny, reference_flags), RankInfo(),
                               str(tiny / "model"), 2)
        expected[name] = (reference.compute_log_probs(batch)[0],
                          *step_gradients(reference, batch))
    return expected


@pytest.mark.parametrize("name", list(RUNS))
def test_step_and_log_probs_equal_one_process(ranks, one_process, name):
    """Loss terms, the global gradient norm, every gradient and every log-prob equal
    those of one process."""
    results = ranks[1]
    expected_log_probs, expected_metrics, expected_grads = one_process[name]
    metrics, grads = results[name]
    assert expected_metrics["train/pg_clipfrac"] > 0
    assert_matches_one_process(metrics, grads, results[f"{name}/log_probs"],
                               (expected_log_probs, expected_metrics, expected_grads))


@pytest.mark.parametrize("name", list(RUNS))
def test_each_rank_holds_its_part_of_the_tokens(ranks, name):
    """In every forward a rank embeds ceil(T / C) tokens of the packed row of T, and its
    attention core sees the whole row padded to a multiple of C, with heads / (tp C)
    query heads and the KV heads those read; rows that C does not divide occur."""
    tp, cp, _, _ = RUNS[name]
    kv_heads = KV_HEADS // tp
    kv_per_rank = math.lcm(kv_heads, cp) // cp
    rows = set()
    for layouts in ranks[1]["layouts"]:
        held = layouts[f"{name}/layout"]["held"]
        assert held
        for forward in held:
            part = -(-forward["row"] // cp)
            assert forward["embedded"] == part, forward
            assert forward["attention"] == (part * cp, HEADS // (tp * cp), kv_per_rank), forward
            rows.add(forward["row"])
    assert any(row % cp for row in rows), rows


def test_max_tokens_per_gpu_counts_one_ranks_tokens(ranks):
    """cp4 with --max-tokens-per-gpu 12: rows of more than 12 tokens, each rank holding
    at most 12 of them."""
    for layouts in ranks[1]["layouts"]:
        held = layouts["cp4/layout"]["held"]
        assert max(forward["row"] for forward in held) > BUDGET
        assert max(forward["embedded"] for forward in held) <= BUDGET


def test_the_batch_has_samples_shorter_than_the_context_parallel_size(ranks):
    assert min(len(tokens) for tokens in ranks[0].tokens) < max(cp for _, cp, _, _
                                                                in RUNS.values())


@pytest.mark.parametrize("name", list(RUNS))
def test_parameters_are_sharded_over_data_and_context_ranks(tiny, ranks, name):
    """FSDP shards each weight over the dp x cp ranks ("dp_cp"); tensor-parallel slices
    stay over "tp"."""
    tp, cp, _, _ = RUNS[name]
    full = dict(load_hf_model(str(tiny / "model")).named_parameters())
    shards = WORLD // tp
    layouts = [layouts[f"{name}/layout"] for layouts in ranks[1]["layouts"]]
    rows = [layout[EMBEDDING]["local_shape"][0] for layout in layouts]
    assert max(rows) == -(-full[EMBEDDING].shape[0] // shards)
    assert sum(rows) == tp * full[EMBEDDING].shape[0]  # each tensor-parallel rank holds all
    for layout in layouts:
        assert layout[EMBEDDING]["placements"] == {"dp_cp": Shard(0)}
        query = layout[QUERY]
        assert ("tp" in query["placements"]) == (tp > 1)
        assert query["local_shape"][0] == full[QUERY].shape[0] // WORLD


@pytest.mark.parametrize("name", list(RUNS))
def test_full_weights_are_the_checkpoint(tiny, ranks, name):
    """Gathered weights (what checkpoints and weight pushes see) are the HF tensors."""
    expected = dict(load_hf_model(str(tiny / "model")).named_parameters())
    weights = ranks[1][f"{name}/weights"]
    assert list(weights) == list(expected)
    for key, tensor in weights.items():
        assert torch.equal(tensor, expected[key].detach()), (name, key)


def test_a_save_under_cp2_resumes_under_cp1_and_back(ranks):
    """The optimizer shards of dp x cp ranks are those of as many data-parallel ranks:
    dp4 restores a dp2 x cp2 save and takes the step the saving run took (Adam's moments
    included), and dp2 x cp2 restores a dp4 save, weights bit-exact, likewise."""
    resume = ranks[1]["resume"]
    for step in ("second", "third"):
        assert_same_step(resume[f"resumed_{step}"], resume[f"resumed_{step}_weights"],
                         resume[step], resume[f"{step}_weights"])
    for key, tensor in resume["loaded"].items():
        assert torch.equal(tensor, resume["resumed_second_weights"][key]), key


def test_weights_reach_an_engine_from_a_context_parallel_trainer(tiny, ranks):
    """The engine serves the trained weights exactly, not the initial ones."""
    assert_engine_serves_the_push(ranks[1]["resume"]["pushed"], tiny, QUERY)


# ---- layouts refused up front -------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--context-parallel-size", "2"], ["--context-parallel-size 2", "one process"]),
    (["--actor-num-gpus-per-node", "4", "--colocate", "--context-parallel-size", "3"],
     ["--context-parallel-size 3 x --tensor-model-parallel-size 1 does not divide the 4",
      "multiple of 3"]),
    (["--actor-num-gpus-per-node", "3", "--colocate", "--context-parallel-size", "3"],
     ["--context-parallel-size 3", "4 attention heads", "divides 4"]),
    (["--actor-num-gpus-per-node", "8", "--colocate", "--tensor-model-parallel-size", "2",
      "--context-parallel-size", "4"],
     ["--context-parallel-size 4", "--tensor-model-parallel-size 2", "divides 2"]),
])
def test_placement_refuses_impossible_layouts(tiny, flags, words):
    """Before any weight loads (and under --dry-run): the flag and the fix are named."""
    with pytest.raises(ConfigError) as info:
        plan_placement(load_config(train_argv(tiny, *flags))[0], 0)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_moe_models_take_context_parallelism_with_any_expert_groups(tiny_moe, capsys,
                                                                    monkeypatch):
    """Context parallelism of an MoE model, with or without expert parallelism, the groups
    within the data-parallel ranks or across the stage's whole grid (their numbers:
    test_expert_parallel.py); --dry-run says where the groups come from."""
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    flags = ["--actor-num-gpus-per-node", "8", "--colocate", "--context-parallel-size", "2"]
    across = ["--tensor-model-parallel-size", "2", "--sequence-parallel",
              "--expert-model-parallel-size", "4"]
    for extra in ([], ["--expert-model-parallel-size", "2"], across):
        plan_placement(load_config(train_argv(tiny_moe, *flags, *extra))[0], 0)
    assert cli.main(train_argv(tiny_moe, *flags, *across, "--dry-run")) == 0
    assert "mesh: dp 2 x cp 2 x tp 2 x pp 1 (ep 4, carved from dp x cp x tp)" \
        in capsys.readouterr().out


def test_dry_run_prints_the_mesh(tiny, capsys, monkeypatch):
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    argv = train_argv(tiny, "--actor-num-gpus-per-node", "8", "--colocate",
                      "--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                      "--dry-run")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "mesh: dp 2 x cp 2 x tp 2 x pp 1 (ep 1, carved from dp) = 8 trainer rank(s)" in out
    assert "the run needs 8 GPUs" in out
