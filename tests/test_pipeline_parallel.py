"""Pipeline parallelism (--pipeline-model-parallel-size) on the tiny dense model (2 decoder
layers, tied embeddings) gives the numbers of one process, and is in effect.

One spawn of four CPU ranks (gloo), shared by the xdist workers, runs every layout of two
stages: pp2 x dp2 (FSDP2 over each stage's two data-parallel ranks): per-token loss with dynamic
batching (several packed micro-batches of different lengths: 1F1B), and per-sample loss
with one micro-batch per rank (fewer than the stages: GPipe); pp2 x tp2 with sequence
parallelism and pp2 x cp2 (each stage one tensor- or context-parallel group); on a 4-layer
copy of the model, virtual stages (two chunks of one layer per rank: interleaved 1F1B),
also with tp2 and sequence parallelism, and an uneven first stage (1 layer, the last 3).
Equality alone would hold with a rank that quietly runs the whole model, so each rank
records which decoder layers it holds, which it runs, which run in each of its chunks'
forwards, and how many of each micro-batch's tokens reach each layer. Then a pp2 run's
save (model and optimizer state) resumes under pp1 (four data-parallel ranks), weights
bit-exact, and takes the step pp2 took next; a pp1 save likewise under pp2; and the pp2
trainer pushes its weights into an engine, which serves them. Tolerances as in test_parallel.
"""
from __future__ import annotations

import asyncio
import functools
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from filelock import FileLock

from furlong import cli, dry_run
from furlong.cluster.placement import plan_placement
from furlong.config import ConfigError, load_config
from furlong.engine.hf_engine import HFEngine
from furlong.model.loading import load_hf_model
from furlong.ports import free_port
from furlong.train import distributed_state, parallel, pipeline_parallel
from furlong.train.pipeline_layout import (PipelineLayout, chunk_layer_ranges, describe_layout,
                                           rank_chunks)
from furlong.train.actor import RankInfo, TrainActor

from conftest import policy_config, train_argv, write_teacher
from test_parallel import METRICS, assert_close_relative, assert_engine_serves_the_push, \
    assert_same_step, cpu_weights, prepared_batch, step_gradients, teacher_flags

WORLD = 4
STAGES = 2
DYNAMIC = ["--calculate-per-token-loss", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "40"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
# (step flags, layout flags besides the pipeline's)
RUNS = {
    "pp2_dynamic": (DYNAMIC, []),
    "pp2_one_micro_batch": (["--micro-batch-size", "12"], []),
    "pp2_tp2_sp": (DYNAMIC, TP2_SP),
    "pp2_cp2": (DYNAMIC, ["--context-parallel-size", "2"]),
}
# On the 4-layer copy: (step flags, layout flags, the layers each stage holds).
VIRTUAL = ["--num-layers-per-virtual-pipeline-stage", "1"]
DEEP_RUNS = {
    "pp2_virtual": (DYNAMIC, VIRTUAL, [[0, 2], [1, 3]]),
    "pp2_uneven": (["--micro-batch-size", "2"], ["--decoder-first-pipeline-num-layers", "1"],
                   [[0], [1, 2, 3]]),
    # One data-parallel rank: a budget of twice the tokens makes as many micro-batches.
    "pp2_virtual_tp2_sp": ([*DYNAMIC[:-1], "80"], [*VIRTUAL, *TP2_SP], [[0, 2], [1, 3]]),
}
QUERY = "model.layers.1.self_attn.q_proj.weight"


def write_deep(tiny: Path, out: Path) -> Path:
    """The tiny model and task with 4 decoder layers (seeded random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    shutil.copytree(tiny, out, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(tiny / "model", num_hidden_layers=4,
                                        layer_types=["full_attention"] * 4)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "model")
    return out


def run_of(name: str, tiny: Path, deep: Path) -> tuple[Path, list[str], list[str]]:
    """(model and task directory, step flags, layout flags) of a run."""
    if name in RUNS:
        return tiny, *RUNS[name]
    return deep, *DEEP_RUNS[name][:2]


def size_of(flags: list[str], flag: str) -> int:
    return int(flags[flags.index(flag) + 1]) if flag in flags else 1


def pipelined_step_gradients(actor: TrainActor, batch) -> tuple[dict, dict]:
    """Metrics and full gradients (every stage's, by HF name) of one optimizer step; the
    update itself is skipped."""
    grads = {}

    def capture():
        role = actor.policy.pipeline
        tied = pipeline_parallel.tied_weight(actor.policy.hf_model, role)
        pipeline_parallel.sum_tied_gradient(tied, actor.pipeline_groups[1])
        mine = {role.global_name(name): distributed_state.full_tensor(param.grad).cpu()
                for name, param in actor.policy.hf_model.named_parameters()
                if param is not tied or role.is_first}  # the tied weight under its first name
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, mine)
        for part in gathered:
            grads.update({name: grad for name, grad in part.items() if name not in grads})
        norm = distributed_state.clip_grad_norm_(actor.policy.parameters(), float("inf"),
                                                 STAGES, tied if role.is_last else None)
        actor.optimizer.zero_grad()
        return norm

    actor._optimizer_step = capture
    (metrics,) = actor.train(batch)
    return metrics, grads


# ---- the ranks --------------------------------------------------------------------------
def _worker(rank: int, port: int, tiny: Path, deep: Path, batch, out: Path) -> None:
    torch.set_num_threads(1)
    results = {}

    def actor_for(pp: int, extra: list[str], init: Path | None = None,
                  root: Path = tiny) -> TrainActor:
        info = parallel.rank_info(rank, WORLD, size_of(extra, "--tensor-model-parallel-size"),
                                  "cpu", master_port=port, pp_size=pp,
                                  cp_size=size_of(extra, "--context-parallel-size"))
        flags = [*extra, "--pipeline-model-parallel-size", str(pp)]
        return TrainActor(policy_config(root, flags), info, str(init or root / "model"), 2)

    for name in [*RUNS, *DEEP_RUNS]:
        root, extra, layout = run_of(name, tiny, deep)
        actor = actor_for(STAGES, [*extra, *layout], root=root)
        results[f"{name}/weights"] = cpu_weights(actor)
        results.update(_run_recorded(actor, batch, name))
    results["resume"] = _across_layouts(actor_for, batch, out, tiny)
    results["teacher"] = actor_for(STAGES, [*TP2_SP, *teacher_flags(out)]) \
        .compute_teacher_log_probs(batch)  # --opd-type megatron, split over the stages
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, {k: v for k, v in results.items() if "layout" in k})
    if rank == 0:
        torch.save({**results, "layouts": gathered}, out / "results.pt")


def _run_recorded(actor: TrainActor, batch, name: str) -> dict:
    """Log-probs and a step of `actor`, recording the (global) decoder layers each of its
    forwards of one chunk runs, the rows each layer's input holds beside the tokens of
    the micro-batch, and the schedules that ran them."""
    role, chunks_ran, rows, schedules = actor.policy.pipeline, [], [], []

    def enter_chunk(module, args):
        chunks_ran.append([])
        rows.append((args[0].num_tokens, []))  # (the micro-batch's tokens, layer inputs)

    def enter_layer(module, args, index):
        chunks_ran[-1].append(role.layers[index])
        hidden = args[0].to_local() if isinstance(args[0], DTensor) else args[0]
        rows[-1][1].append(hidden.shape[1])
    actor.policy.register_forward_pre_hook(enter_chunk)
    for index, layer in enumerate(parallel.decoder_layers(actor.policy.hf_model)):
        layer.register_forward_pre_hook(functools.partial(enter_layer, index=index))
    choose = pipeline_parallel.schedule_class
    pipeline_parallel.schedule_class = lambda *args: schedules.append(
        choose(*args).__name__) or choose(*args)
    try:
        results = {f"{name}/log_probs": actor.compute_log_probs(batch)[0],
                   name: pipelined_step_gradients(actor, batch)}
    finally:
        pipeline_parallel.schedule_class = choose
    ran = [layer for chunk in chunks_ran for layer in chunk]
    query = _local_query(actor)
    results[f"{name}/layout"] = {
        "held": sorted({role.global_name(n) for n, _ in actor.policy.hf_model.named_parameters()}),
        "ran": sorted(set(ran)), "forwards": len(ran),
        "chunks_ran": sorted({tuple(chunk) for chunk in chunks_ran}),
        "rows": rows, "schedules": schedules,
        "query_rows": None if query is None else query.to_local().shape[0],
        "query_mesh": None if query is None else query.device_mesh.mesh_dim_names}
    return results


def _local_query(actor: TrainActor) -> DTensor | None:
    """This rank's layer-0 query weight; None on a stage without it."""
    params = {actor.policy.pipeline.global_name(n): p
              for n, p in actor.policy.hf_model.named_parameters()}
    return params.get("model.layers.0.self_attn.q_proj.weight")


def _across_layouts(actor_for, batch, out: Path, tiny: Path) -> dict:
    """pp2 trains a step, saves, and trains another; pp1 starts from that save (model and
    optimizer state) and takes the same second step, saves, and trains a third; pp2 starts
    from that save and takes the same third step, then pushes its weights to an engine."""
    flags = ["--lr", "1e-3", "--micro-batch-size", "3"]
    pipelined = actor_for(2, flags)
    pipelined.train(batch)
    result = {"saved_by_pp2": _save(pipelined, out / "saved_by_pp2")}
    result["pp2_next"] = _step(pipelined, batch)
    data_parallel = actor_for(1, flags, init=out / "saved_by_pp2" / "model")
    result["loaded_by_pp1"] = cpu_weights(data_parallel)
    data_parallel.restore(out / "saved_by_pp2")
    result["pp1_resumed"] = _step(data_parallel, batch)
    result["saved_by_pp1"] = _save(data_parallel, out / "saved_by_pp1")
    result["pp1_next"] = _step(data_parallel, batch)
    pipelined_again = actor_for(2, flags, init=out / "saved_by_pp1" / "model")
    result["loaded_by_pp2"] = cpu_weights(pipelined_again)
    pipelined_again.restore(out / "saved_by_pp1")
    result["pp2_resumed"] = _step(pipelined_again, batch)
    return {**result, "pushed": _push(pipelined_again, tiny)}


def _save(actor: TrainActor, directory: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    actor.save(directory, save_optimizer=True)
    return cpu_weights(actor)


def _step(actor: TrainActor, batch) -> tuple[dict, dict]:
    """(metrics, full weights after the update) of one optimizer step."""
    (metrics,) = actor.train(batch)
    return metrics, cpu_weights(actor)


def _push(actor: TrainActor, tiny: Path) -> dict:
    from transformers import AutoTokenizer
    engine = HFEngine(load_hf_model(str(tiny / "model")), AutoTokenizer.from_pretrained(
        tiny / "model"))
    asyncio.run(actor.push_weights(engine, 1))
    return {"trainer": cpu_weights(actor), "version": engine.weight_version,
            "served": {n: t.detach().clone() for n, t in engine.model.named_parameters()}}


# ---- the checks ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep(tiny, tmp_path_factory) -> Path:
    return write_deep(tiny, tmp_path_factory.mktemp("deep"))


@pytest.fixture(scope="module")
def ranks(tiny, deep, tmp_path_factory):
    """(batch, results of the 4-rank spawn). The spawn runs once per session: under
    pytest-xdist the first worker here runs it, the others read its results."""
    batch = prepared_batch(tiny)
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "pipeline"
    with FileLock(f"{out}.lock"):
        if not (out / "results.pt").is_file():
            out.mkdir(exist_ok=True)
            write_teacher(tiny, out / "teacher")
            mp.spawn(_worker, args=(free_port(), tiny, deep, batch, out), nprocs=WORLD)
    return batch, torch.load(out / "results.pt", weights_only=True)


@pytest.mark.parametrize("name", [*RUNS, *DEEP_RUNS])
def test_step_and_log_probs_equal_one_process(tiny, deep, ranks, name):
    """Loss terms, the global gradient norm, every gradient (the tied embedding's summed
    over the first and last stages) and every log-prob equal those of one process."""
    batch, results = ranks
    root, flags, _ = run_of(name, tiny, deep)
    reference = TrainActor(policy_config(root, flags), RankInfo(), str(root / "model"), 2)
    expected_log_probs = reference.compute_log_probs(batch)[0]
    expected_metrics, expected_grads = step_gradients(reference, batch)
    metrics, grads = results[name]
    for key in METRICS:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    assert sorted(grads) == sorted(expected_grads)
    for key, grad in grads.items():
        assert_close_relative(grad, expected_grads[key])
    for actual, expected in zip(results[f"{name}/log_probs"], expected_log_probs, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_a_pipelined_teacher_scores_as_one_process(tiny, ranks, tmp_path):
    """--opd-type megatron with pipeline stages (and tensor parallelism in each): the
    teacher's log-probs of every sample equal one process's teacher's."""
    batch, results = ranks
    out = tmp_path
    write_teacher(tiny, out / "teacher")
    actor = TrainActor(policy_config(tiny, teacher_flags(out)), RankInfo(),
                       str(tiny / "model"), 2)
    expected = actor.compute_teacher_log_probs(batch)
    policy = actor.compute_log_probs(batch)[0]
    assert not torch.allclose(torch.cat(expected), torch.cat(policy), atol=1e-2)
    for actual, want in zip(results["teacher"], expected, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(RUNS))
def test_each_rank_holds_and_runs_half_of_the_layers(ranks, name):
    """Ranks 0-1 (stage 0) hold and run layer 0 and the embeddings, ranks 2-3 (stage 1)
    layer 1, the final norm and the (tied) output weight; FSDP shards a stage's weights
    over its two data-parallel ranks; the dynamic batches make several micro-batches."""
    layouts = [layouts[f"{name}/layout"] for layouts in ranks[1]["layouts"]]
    stages = [rank // (WORLD // STAGES) for rank in range(WORLD)]
    assert [layout["ran"] for layout in layouts] == [[stage] for stage in stages]
    for stage, layout in zip(stages, layouts, strict=True):
        layers = {n.split(".")[2] for n in layout["held"] if n.startswith("model.layers.")}
        assert layers == {str(stage)}
        assert layout["query_rows"] == (None if stage else 128 // 2)
    if name == "pp2_dynamic":  # the log-prob pass and the step, each of 2 micro-batches or more
        assert min(layout["forwards"] for layout in layouts) >= 4
    assert "model.embed_tokens.weight" in layouts[0]["held"]
    assert "model.norm.weight" in layouts[-1]["held"] and "lm_head.weight" in layouts[-1]["held"]
    assert "model.norm.weight" not in layouts[0]["held"]


@pytest.mark.parametrize("name", [*RUNS, *DEEP_RUNS])
def test_tensor_and_context_parallel_ranks_run_part_of_each_row(tiny, deep, ranks, name):
    """Within a stage, with sequence or context parallelism every decoder layer's input
    on a rank holds at most half of the micro-batch's tokens (whole rows travel between
    stages); otherwise the whole row. Tensor-parallel ranks hold half of the query
    heads (a "tp" slice), context-parallel ones an FSDP shard over "dp_cp"."""
    layout_flags = run_of(name, tiny, deep)[2]
    split = "--sequence-parallel" in layout_flags or "--context-parallel-size" in layout_flags
    for layouts in ranks[1]["layouts"]:
        layout = layouts[f"{name}/layout"]
        for tokens, inputs in layout["rows"]:
            assert inputs and all(rows == (-(-tokens // 2) if split else tokens)
                                  or split and rows == tokens // 2 for rows in inputs), \
                (tokens, inputs)
        if layout["query_mesh"] is not None:
            assert layout["query_rows"] == 128 // 2
            assert ("tp" in layout["query_mesh"]) == ("--tensor-model-parallel-size"
                                                      in layout_flags), layout["query_mesh"]


@pytest.mark.parametrize("name", list(DEEP_RUNS))
def test_each_rank_holds_and_runs_its_chunks(ranks, name):
    """Virtual stages: stage 0 holds layers 0 and 2, stage 1 layers 1 and 3, each chunk's
    forward runs its one layer, and interleaved 1F1B runs them. Uneven stages: stage 0
    holds layer 0 (and the embeddings), stage 1 layers 1-3 (and the head)."""
    layouts = [layouts[f"{name}/layout"] for layouts in ranks[1]["layouts"]]
    held = DEEP_RUNS[name][2]
    for rank, layout in enumerate(layouts):
        stage_layers = held[rank // (WORLD // STAGES)]
        layers = {int(n.split(".")[2]) for n in layout["held"] if n.startswith("model.layers.")}
        assert layers == set(stage_layers) and layout["ran"] == stage_layers
        virtual = VIRTUAL[0] in DEEP_RUNS[name][1]
        chunks = [(layer,) for layer in stage_layers] if virtual else [tuple(stage_layers)]
        assert layout["chunks_ran"] == chunks
        expected = "ScheduleInterleaved1F1B" if virtual else "Schedule1F1B"
        assert layout["schedules"] == [expected] * 2  # the log-prob pass and the step
    assert "model.embed_tokens.weight" in layouts[0]["held"]
    assert "model.norm.weight" in layouts[-1]["held"] and "lm_head.weight" in layouts[-1]["held"]
    assert "model.norm.weight" not in layouts[0]["held"]


@pytest.mark.parametrize("name", [*RUNS, *DEEP_RUNS])
def test_full_weights_are_the_checkpoint(tiny, deep, ranks, name):
    root = run_of(name, tiny, deep)[0]
    expected = dict(load_hf_model(str(root / "model")).named_parameters())
    weights = ranks[1][f"{name}/weights"]
    assert sorted(weights) == sorted(expected)
    for key, tensor in weights.items():
        assert torch.equal(tensor, expected[key].detach()), (name, key)


def test_a_pp2_model_loads_under_pp1_and_back(ranks):
    resume = ranks[1]["resume"]
    for saved, loaded in (("saved_by_pp2", "loaded_by_pp1"), ("saved_by_pp1", "loaded_by_pp2")):
        assert sorted(resume[saved]) == sorted(resume[loaded])
        for key, tensor in resume[saved].items():
            assert torch.equal(resume[loaded][key], tensor), (saved, key)


def test_a_pp2_save_resumes_under_pp1_and_back_to_the_next_step(ranks):
    """With the optimizer state, a resumed run takes the step the saving run took next
    (Adam's moments included: the weights after the update agree), across layouts."""
    resume = ranks[1]["resume"]
    for resumed, uninterrupted in (("pp1_resumed", "pp2_next"), ("pp2_resumed", "pp1_next")):
        (metrics, weights), (expected_metrics, expected_weights) = (resume[resumed],
                                                                    resume[uninterrupted])
        assert sorted(weights) == sorted(expected_weights)
        assert_same_step(metrics, weights, expected_metrics, expected_weights)


def test_weights_reach_an_engine_from_a_pipelined_trainer(tiny, ranks):
    assert_engine_serves_the_push(ranks[1]["resume"]["pushed"], tiny, QUERY)


# ---- layouts refused up front -------------------------------------------------------------
@pytest.mark.parametrize("flags, words", [
    (["--pipeline-model-parallel-size", "2"], ["--pipeline-model-parallel-size 2",
                                               "one process"]),
    (["--actor-num-gpus-per-node", "3", "--colocate", "--pipeline-model-parallel-size", "2"],
     ["--pipeline-model-parallel-size 2 does not divide the 3 trainer ranks", "multiple of 2"]),
    (["--actor-num-gpus-per-node", "4", "--colocate", "--pipeline-model-parallel-size", "4"],
     ["--pipeline-model-parallel-size 4 does not divide the model's 2 decoder layers",
      "divisor of 2"]),
    (["--actor-num-gpus-per-node", "4", "--colocate", "--pipeline-model-parallel-size", "2",
      "--context-parallel-size", "4"],
     ["--context-parallel-size 4 x --tensor-model-parallel-size 1 does not divide the 2 "
      "trainer ranks"]),
])
def test_placement_refuses_impossible_layouts(tiny, flags, words):
    with pytest.raises(ConfigError) as info:
        plan_placement(load_config(train_argv(tiny, *flags))[0], 0)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("flags, error", [
    (["3", "--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "2"],
     None),
    (["2", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
     None),
    (["3", "--pipeline-model-parallel-size", "3"], "divisor of 4"),
    (["2", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage"),
])
def test_placement_checks_uneven_and_virtual_layouts_up_front(deep, flags, error):
    """Before Ray starts: 4 layers split 2+1+1 or into virtual stages are taken, 4 layers
    over 3 equal stages or virtual stages of 3 are refused, naming config.json."""
    argv = train_argv(deep, "--colocate", "--actor-num-gpus-per-node", *flags)
    if error is None:
        assert plan_placement(load_config(argv)[0], 0).trainer_ranks == int(flags[0])
        return
    with pytest.raises(ConfigError) as info:
        plan_placement(load_config(argv)[0], 0)
    assert error in str(info.value) and "config.json" in str(info.value), str(info.value)


def test_dry_run_prints_the_pipeline_in_the_mesh(tiny, capsys, monkeypatch):
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    argv = train_argv(tiny, "--actor-num-gpus-per-node", "4", "--colocate",
                      "--pipeline-model-parallel-size", "2", "--dry-run")
    assert cli.main(argv) == 0
    assert "mesh: dp 2 x cp 1 x tp 1 x pp 2 (ep 1, carved from dp) = 4 trainer rank(s)" \
        in capsys.readouterr().out
    assert cli.main([*argv, "--actor-num-gpus-per-node", "8", "--tensor-model-parallel-size",
                     "2", "--sequence-parallel", "--context-parallel-size", "2"]) == 0
    assert "mesh: dp 1 x cp 2 x tp 2 x pp 2 (ep 1, carved from dp) = 8 trainer rank(s)" \
        in capsys.readouterr().out


def test_dry_run_prints_uneven_and_virtual_stages(tiny, deep, capsys, monkeypatch):
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    argv = train_argv(deep, "--actor-num-gpus-per-node", "4", "--colocate",
                      "--pipeline-model-parallel-size", "2", "--dry-run")
    assert cli.main([*argv, "--num-layers-per-virtual-pipeline-stage", "1"]) == 0
    assert ("pipeline: 4 decoder layers over 2 stages, 2 virtual stages per rank "
            "(interleaved): stage 0: layers 0, 2; stage 1: layers 1, 3") in capsys.readouterr().out
    assert cli.main([*argv, "--decoder-last-pipeline-num-layers", "3"]) == 0
    assert "over 2 stages: stage 0: layers 0; stage 1: layers 1-3" in capsys.readouterr().out
    assert cli.main([*argv, "--decoder-first-pipeline-num-layers", "3",
                     "--decoder-last-pipeline-num-layers", "2"]) == 2
    assert "the first and last stage sizes must sum to 4" in capsys.readouterr().err
    assert cli.main([*argv, "--num-layers-per-virtual-pipeline-stage", "3"]) == 2
    assert "--num-layers-per-virtual-pipeline-stage 3 with --pipeline-model-parallel-size 2 " \
        "does not split the model's 4 decoder layers" in capsys.readouterr().err


# ---- the layout arithmetic ------------------------------------------------------------------
@pytest.mark.parametrize("layout, expected", [
    (PipelineLayout(2), [range(0, 2), range(2, 4)]),
    (PipelineLayout(2, first_stage_layers=1), [range(0, 1), range(1, 4)]),
    (PipelineLayout(2, last_stage_layers=1), [range(0, 3), range(3, 4)]),
    (PipelineLayout(3, first_stage_layers=2), [range(0, 2), range(2, 3), range(3, 4)]),
    (PipelineLayout(3, first_stage_layers=1, last_stage_layers=1),
     [range(0, 1), range(1, 3), range(3, 4)]),
    (PipelineLayout(2, layers_per_virtual_stage=1), [range(i, i + 1) for i in range(4)]),
])
def test_chunks_of_uneven_and_virtual_layouts(layout, expected):
    assert chunk_layer_ranges(4, layout) == expected


def test_virtual_stages_are_interleaved_over_the_ranks():
    """Chunk c of P x V goes to rank c % P (Megatron's and torch's interleaved layout)."""
    layout = PipelineLayout(2, layers_per_virtual_stage=2)
    assert [rank_chunks(8, layout, rank) for rank in range(2)] == [
        [range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    assert describe_layout(8, layout) == ("pipeline: 8 decoder layers over 2 stages, 2 virtual "
                                          "stages per rank (interleaved): stage 0: layers 0-1, "
                                          "4-5; stage 1: layers 2-3, 6-7")


@pytest.mark.parametrize("layout, words", [
    (PipelineLayout(3), ["--pipeline-model-parallel-size 3 does not divide the model's 4",
                         "divisor of 4", "--decoder-first-pipeline-num-layers"]),
    (PipelineLayout(2, 3, 2), ["--decoder-first-pipeline-num-layers 3 and "
                               "--decoder-last-pipeline-num-layers 2", "must sum to 4"]),
    (PipelineLayout(3, 2, 2), ["leaves 0 for the other 1 stage(s)", "smaller"]),
    (PipelineLayout(3, last_stage_layers=1), ["the 3 decoder layers left (of 4) do not split "
                                              "equally over the other 2 stage(s)"]),
    (PipelineLayout(2, layers_per_virtual_stage=3),
     ["--num-layers-per-virtual-pipeline-stage 3 with --pipeline-model-parallel-size 2",
      "pp x n divides 4"]),
    (PipelineLayout(2, 1, None, 1), ["--num-layers-per-virtual-pipeline-stage with "
                                     "--decoder-first-pipeline-num-layers", "one or the other"]),
])
def test_impossible_layouts_are_refused_naming_the_flag(layout, words):
    with pytest.raises(ValueError) as info:
        chunk_layer_ranges(4, layout)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("count, chunks, expected", [
    (4, 1, "Schedule1F1B"), (1, 1, "ScheduleGPipe"), (2, 2, "ScheduleInterleaved1F1B"),
    (4, 2, "ScheduleInterleaved1F1B"), (5, 2, "ScheduleLoopedBFS"), (1, 2,
                                                                     "ScheduleInterleaved1F1B")])
def test_schedule_for_the_micro_batch_count(count, chunks, expected):
    """Interleaved 1F1B runs max(1, count // stages) rounds, which must divide the count."""
    assert pipeline_parallel.schedule_class(count, 2, chunks).__name__ == expected


@pytest.mark.parametrize("flag", ["--num-layers-per-virtual-pipeline-stage",
                                  "--decoder-first-pipeline-num-layers",
                                  "--decoder-last-pipeline-num-layers"])
def test_stage_size_flags_need_stages(tiny, flag):
    with pytest.raises(ConfigError, match=f"{flag} 1 needs --pipeline-model-parallel-size"):
        load_config(train_argv(tiny, flag, "1"))
    with pytest.raises(ConfigError, match=f"{flag} 0: must be > 0"):
        load_config(train_argv(tiny, flag, "0", "--pipeline-model-parallel-size", "2"))
