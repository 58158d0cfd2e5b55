"""The fsdp backend over several ranks gives the numbers of one process.

Two CPU processes (gloo) run every multi-rank check in one spawn: data parallel
(per-sample loss with fixed micro-batches, per-token loss with dynamic batching, each
with contiguous and with token-balanced shares),
tensor parallel, tensor + sequence parallel with full recomputation, log-probs,
full weights, and save -> restore -> the next step. The references are the plain
one-process trainer (no torch.distributed). Tolerances, all float32: step metrics
and the global gradient norm to 1e-5 relative; gradients to 1e-5 relative plus 1e-5
of the tensor's largest entry (summation order differs between a sum over ranks and
a sum over micro-batches; measured: up to 2e-6 of the largest entry, on the per-head
norm weights under tensor parallel); weights gathered before training bit-exact;
a resumed step to 1e-6 (measured: identical). GPU tests (marked) use bf16 bounds.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp
from filelock import FileLock
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Replicate, Shard

from furlong.model.loading import load_hf_model
from furlong.ports import free_port
from furlong.train import distributed_state, parallel
from furlong.train.actor import RankInfo, TrainActor
from furlong.train.advantage_estimator import compute_advantages
from furlong.train.batch import TrainBatch

from conftest import policy_config, random_batch, write_teacher

WORLD = 2
METRICS = ("train/loss", "train/pg_loss", "train/kl_loss", "train/entropy_loss",
           "train/pg_clipfrac", "train/ppo_kl", "train/grad_norm")
# name -> flags of a multi-rank run; its reference is the same flags in one process,
# less the tensor-parallel ones.
RUNS = {
    "dp": (1, ["--micro-batch-size", "2"]),
    "dp_token_dynamic": (1, ["--calculate-per-token-loss", "--use-dynamic-batch-size",
                             "--max-tokens-per-gpu", "40"]),
    "tp": (2, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "3"]),
    "tp_sp_recompute": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--recompute-granularity", "full", "--recompute-method", "uniform",
                            "--recompute-num-layers", "1", "--calculate-per-token-loss",
                            "--use-dynamic-batch-size", "--max-tokens-per-gpu", "40"]),
}
# The data-parallel runs again with each rank's share balanced by tokens, not contiguous.
RUNS |= {f"{name}_balanced": (1, [*RUNS[name][1], "--balance-data"])
         for name in ("dp", "dp_token_dynamic")}
RESUME_FLAGS = ["--lr", "1e-3"]
TEACHER_RUNS = (RUNS["dp"], RUNS["tp"])  # --opd-type megatron's teacher, sharded


def teacher_flags(out: Path) -> list[str]:
    return ["--use-opd", "--opd-type", "megatron", "--opd-teacher-load", str(out / "teacher")]


def single_process_flags(extra: list[str]) -> list[str]:
    drop = {"--tensor-model-parallel-size": 2, "--sequence-parallel": 1}
    flags, skip = [], 0
    for flag in extra:
        if skip:
            skip -= 1
            continue
        if flag in drop:
            skip = drop[flag] - 1
            continue
        flags.append(flag)
    return flags


def step_gradients(actor: TrainActor, batch) -> tuple[dict, dict]:
    """Metrics and full gradients of one optimizer step (the update itself is skipped)."""
    grads = {}

    def capture():
        grads.update({name: distributed_state.full_tensor(param.grad).cpu().clone()
                      for name, param in actor.policy.hf_model.named_parameters()})
        norm = distributed_state.clip_grad_norm_(actor.policy.parameters(), float("inf"))
        actor.optimizer.zero_grad()
        return norm

    actor._optimizer_step = capture
    (metrics,) = actor.train(batch)
    return metrics, grads


def prepared_batch(tiny: Path, samples: Callable[[int], TrainBatch] | None = None):
    """12 samples (`samples(vocabulary size)`, else random ones) with old log-probs
    (perturbed so that clipping happens), reference log-probs and advantages, from the
    one-process trainer."""
    torch.manual_seed(0)
    actor = TrainActor(policy_config(tiny, []), RankInfo(), str(tiny / "model"), total_steps=1)
    vocab = actor.model_config.vocab_size
    batch = samples(vocab) if samples else random_batch(12, vocab, seed=3)
    batch.old_log_probs, _ = actor.compute_log_probs(batch)
    batch.old_log_probs = [lp + 0.3 * torch.randn_like(lp) for lp in batch.old_log_probs]
    batch.ref_log_probs, _ = actor.compute_log_probs(batch, reference=True)
    batch.advantages, _ = compute_advantages(actor.config.grpo, batch, [i // 4 for i in range(12)])
    return batch


# ---- the ranks --------------------------------------------------------------------------
def _worker(rank: int, port: int, tiny: Path, batch, out: Path, device_type: str = "cpu") -> None:
    torch.set_num_threads(1)
    results = {}

    def actor_for(tp: int, extra: list[str], init: Path | None = None) -> TrainActor:
        info = parallel.rank_info(rank, WORLD, tp, device_type, master_port=port)
        return TrainActor(policy_config(tiny, extra), info, str(init or tiny / "model"), 2)

    for tp, extra in TEACHER_RUNS:
        results[f"teacher/tp{tp}"] = actor_for(tp, [*extra, *teacher_flags(out)]) \
            .compute_teacher_log_probs(batch)
    for name, (tp, extra) in RUNS.items():
        actor = actor_for(tp, extra)
        results[f"{name}/weights"] = cpu_weights(actor)
        results[f"{name}/layout"] = parameter_layout(actor)
        results[f"{name}/log_probs"] = actor.compute_log_probs(batch)[0]
        with recorded_norm_input(actor) as norm_input:
            results[name] = step_gradients(actor, batch)
        results[f"{name}/norm_input"] = norm_input
    results["resume"] = _save_and_resume(actor_for, batch, out / "checkpoint")
    if rank == 0:
        torch.save(results, out / "results.pt")


def _save_and_resume(actor_for, batch, directory: Path) -> dict:
    """Two steps, saving after the first; then a new actor restored from that save."""
    actor = actor_for(1, RESUME_FLAGS)
    actor.train(batch)
    directory.mkdir(parents=True, exist_ok=True)
    actor.save(directory, save_optimizer=True)
    saved_weights = cpu_weights(actor)
    (next_step,) = actor.train(batch)
    resumed = actor_for(1, RESUME_FLAGS, init=directory)
    resumed.restore(directory)
    (resumed_step,) = resumed.train(batch)
    before = actor.compute_log_probs(batch, reference=True)[0]
    actor.update_reference()
    reference = [actor.compute_log_probs(batch, reference=flag)[0]
                 for flag in (False, True)] + [before]
    return {"saved": saved_weights, "next": next_step, "next_weights": cpu_weights(actor),
            "resumed": resumed_step, "resumed_weights": cpu_weights(resumed),
            "reference_updated": reference}


LAYOUT_PARAMETERS = ("model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.o_proj.weight",
                     "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight")


def parameter_layout(actor: TrainActor) -> dict[str, dict]:
    """How this rank holds some parameters: mesh dimension -> placement, and the local
    shape (a plain tensor has no mesh)."""
    layout = {}
    for name, param in actor.policy.hf_model.named_parameters():
        if name in LAYOUT_PARAMETERS:
            placements = dict(zip(param.device_mesh.mesh_dim_names,
                                  param.placements, strict=True)) \
                if isinstance(param, DTensor) else {}
            layout[name] = {"placements": placements, "local_shape": tuple(_local(param).shape)}
    return layout


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextmanager
def recorded_norm_input(actor: TrainActor):
    """What the first decoder layer's input norm receives in the training forwards:
    a list of {"placements", "local_shape"} (placements empty for a plain tensor)."""
    seen = []
    norm = parallel.decoder_layers(actor.policy.hf_model)[0].input_layernorm

    def record(module, args):
        (hidden,) = args
        placements = list(hidden.placements) if isinstance(hidden, DTensor) else []
        seen.append({"placements": placements, "local_shape": tuple(_local(hidden).shape),
                     "shape": tuple(hidden.shape)})
    handle = norm.register_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def cpu_weights(actor: TrainActor) -> dict[str, torch.Tensor]:
    return {name: tensor.cpu() for name, tensor in actor.named_weights()}


# ---- the checks ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory):
    """(prepared batch, results of the 2-rank spawn, its output directory). The spawn runs
    once per session: under pytest-xdist the first worker here runs it and the others
    read its results (the inputs are seeded, so equal)."""
    batch = prepared_batch(tiny)
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "parallel"
    with FileLock(f"{out}.lock"):
        if not (out / "results.pt").is_file():
            out.mkdir(exist_ok=True)
            write_teacher(tiny, out / "teacher")
            mp.spawn(_worker, args=(free_port(), tiny, batch, out), nprocs=WORLD)
    return batch, torch.load(out / "results.pt", weights_only=True), out


def assert_matches_one_process(metrics: dict, grads: dict, log_probs: list,
                               expected: tuple, metric_names: tuple = METRICS) -> None:
    """Loss terms, every gradient and every log-prob of a layout equal one process's
    (expected: log-probs, metrics, gradients)."""
    expected_log_probs, expected_metrics, expected_grads = expected
    for key in metric_names:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    assert list(grads) == list(expected_grads)
    for key, grad in grads.items():
        assert_close_relative(grad, expected_grads[key])
    for actual, want in zip(log_probs, expected_log_probs, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-6)


def assert_same_step(metrics: dict, weights: dict, expected_metrics: dict,
                     expected_weights: dict, metric_names: tuple = METRICS) -> None:
    """A resumed run's step equals the one the saving run took next: its metrics and the
    weights after the update (which Adam's restored moments shape)."""
    for key in metric_names:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    for key, tensor in weights.items():
        torch.testing.assert_close(tensor, expected_weights[key], rtol=1e-5, atol=1e-6)


def assert_engine_serves_the_push(pushed: dict, tiny: Path, query: str) -> None:
    """The engine serves the trained weights a trainer pushed, exactly, not the initial
    ones (`pushed`: version, the trainer's weights and the engine's)."""
    from furlong.model.loading import load_hf_model
    initial = dict(load_hf_model(str(tiny / "model")).named_parameters())
    assert pushed["version"] == 1
    assert not torch.equal(pushed["trainer"][query], initial[query])
    for key, tensor in pushed["trainer"].items():
        assert torch.equal(pushed["served"][key], tensor), key


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def test_a_sharded_teacher_scores_as_one_process(tiny, ranks):
    """--opd-type megatron over data- and tensor-parallel ranks: the teacher's log-probs
    of every sample equal one process's teacher's, which are not the policy's."""
    batch, results, out = ranks
    actor = TrainActor(policy_config(tiny, teacher_flags(out)), RankInfo(),
                       str(tiny / "model"), 2)
    expected = actor.compute_teacher_log_probs(batch)
    policy = actor.compute_log_probs(batch)[0]
    assert not torch.allclose(torch.cat(expected), torch.cat(policy), atol=1e-2)
    for tp, _ in TEACHER_RUNS:
        for actual, want in zip(results[f"teacher/tp{tp}"], expected, strict=True):
            torch.testing.assert_close(actual, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(RUNS))
def test_step_equals_one_process(tiny, ranks, name):
    """(a) data parallel, per-sample and per-token/dynamic, shares contiguous or
    balanced by tokens (--balance-data); (b) tensor parallel;
    (c) tensor + sequence parallel, here with full recomputation of every layer."""
    batch, results, _ = ranks
    reference = TrainActor(policy_config(tiny, single_process_flags(RUNS[name][1])), RankInfo(),
                           str(tiny / "model"), 2)
    expected_metrics, expected_grads = step_gradients(reference, batch)
    metrics, grads = results[name]
    assert expected_metrics["train/pg_clipfrac"] > 0
    for key in METRICS:
        assert metrics[key] == pytest.approx(expected_metrics[key], rel=1e-5, abs=1e-7), key
    assert list(grads) == list(expected_grads)
    for key, grad in grads.items():
        assert_close_relative(grad, expected_grads[key])


@pytest.mark.parametrize("name", ["tp", "tp_sp_recompute"])
def test_tensor_parallel_is_in_effect(tiny, ranks, name):
    """The numbers above would match with tensor parallelism off (one rank on the whole
    batch computes them too): here each rank holds half of every split linear weight,
    sharded over "tp" (q/k/v, gate/up by output rows, o/down by input columns), while
    the embeddings stay whole over "tp"; with sequence parallel the norms see a
    DTensor split along the sequence, each rank holding half of it."""
    full = dict(load_hf_model(str(tiny / "model")).named_parameters())
    layout = ranks[1][f"{name}/layout"]
    row = LAYOUT_PARAMETERS[0]
    assert layout[row]["placements"]["tp"] == Shard(0)
    assert layout[row]["local_shape"] == (full[row].shape[0] // 2, full[row].shape[1])
    for key in LAYOUT_PARAMETERS[1:3]:
        assert layout[key]["placements"]["tp"] == Shard(1), key
        assert layout[key]["local_shape"] == (full[key].shape[0], full[key].shape[1] // 2), key
    assert "tp" not in layout[LAYOUT_PARAMETERS[3]]["placements"]
    seen = ranks[1][f"{name}/norm_input"]
    assert seen
    for hidden in seen:
        if name == "tp":  # every rank normalises the whole sequence
            assert hidden["placements"] in ([], [Replicate()]), hidden
            assert hidden["local_shape"] == hidden["shape"]
        else:
            assert hidden["placements"] == [Shard(1)], hidden
            assert hidden["local_shape"][1] == -(-hidden["shape"][1] // 2), hidden


def test_data_parallel_shards_over_dp_only(tiny, ranks):
    """--tensor-model-parallel-size 1 on 2 ranks: FSDP shards each weight over "dp"."""
    full = dict(load_hf_model(str(tiny / "model")).named_parameters())
    for key, held in ranks[1]["dp/layout"].items():
        assert held["placements"] == {"dp": Shard(0)}, key
        assert held["local_shape"][0] == -(-full[key].shape[0] // 2), key


@pytest.mark.parametrize("name", ["dp", "tp"])
def test_log_probs_equal_one_process(tiny, ranks, name):
    """(e) compute_log_probs: every rank holds every sample's values."""
    batch, results, _ = ranks
    reference = TrainActor(policy_config(tiny, []), RankInfo(), str(tiny / "model"), 1)
    expected, _ = reference.compute_log_probs(batch)
    for actual, values in zip(results[f"{name}/log_probs"], expected, strict=True):
        torch.testing.assert_close(actual, values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(RUNS))
def test_full_named_weights_are_the_checkpoint(tiny, ranks, name):
    """(f) gathered FSDP shards and tensor-parallel slices give back the HF weights
    exactly, with HF names, tied embeddings once."""
    expected = dict(load_hf_model(str(tiny / "model")).named_parameters())
    weights = ranks[1][f"{name}/weights"]
    assert list(weights) == list(expected)
    for key, tensor in weights.items():
        assert torch.equal(tensor, expected[key].detach()), key


def test_resume_gives_the_next_step(ranks):
    """(g) save on 2 ranks, restore on 2 ranks: the next step's loss, gradient norm and
    updated weights are those of the run that did not stop (Adam's moments included:
    without them the second update differs)."""
    resume = ranks[1]["resume"]
    for key in METRICS:
        assert resume["resumed"][key] == pytest.approx(resume["next"][key], rel=1e-6, abs=1e-9)
    for key, tensor in resume["resumed_weights"].items():
        torch.testing.assert_close(tensor, resume["next_weights"][key], rtol=1e-6, atol=1e-7)
    moved = [key for key, tensor in resume["next_weights"].items()
             if not torch.equal(tensor, resume["saved"][key])]
    assert moved, "the step after the save changed no weight"


def test_update_reference_copies_the_sharded_policy(ranks):
    policy, reference, before = ranks[1]["resume"]["reference_updated"]
    assert not all(torch.equal(a, b) for a, b in zip(before, policy, strict=True))
    for actual, expected in zip(reference, policy, strict=True):
        assert torch.equal(actual, expected)


def test_saved_model_loads_with_transformers(ranks):
    """(g) the model/ directory of a 2-rank save is an HF model with the trained weights."""
    from transformers import AutoModelForCausalLM
    directory = ranks[2] / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(directory / "model", dtype=torch.float32)
    saved = ranks[1]["resume"]["saved"]
    for key, tensor in model.named_parameters():
        assert torch.equal(tensor.detach(), saved[key]), key


def test_a_save_of_data_parallel_ranks_resumes_in_one_process(tiny, ranks):
    """The optimizer state is whole tensors by name: one process restores what the
    data-parallel ranks saved and takes the step they took next, which it does not
    without the state (Adam's moments matter at the second step)."""
    batch, resume, directory = ranks[0], ranks[1]["resume"], ranks[2] / "checkpoint"
    steps = {}
    for restored in (True, False):
        actor = TrainActor(policy_config(tiny, RESUME_FLAGS), RankInfo(),
                           str(directory / "model"), 2)
        if restored:
            actor.restore(directory)
        (step,) = actor.train(batch)
        steps[restored] = step, cpu_weights(actor)
    assert_same_step(*steps[True], resume["next"], resume["next_weights"])
    assert any(not torch.allclose(tensor, resume["next_weights"][key], rtol=1e-4, atol=1e-6)
               for key, tensor in steps[False][1].items())


# ---- one process ------------------------------------------------------------------------
@pytest.mark.parametrize("flags, wrapped", [
    (["--recompute-granularity", "full", "--recompute-method", "uniform"], [True, True]),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "1"], [True, False]),
    (["--recompute-granularity", "selective"], [False, False]),
])
def test_recomputation_gives_the_same_gradients(tiny, flags, wrapped):
    """(d) activation checkpointing changes memory, not numbers."""
    batch = prepared_batch(tiny)
    plain = step_gradients(TrainActor(policy_config(tiny, []), RankInfo(), str(tiny / "model"), 1),
                           batch)
    actor = TrainActor(policy_config(tiny, flags), RankInfo(), str(tiny / "model"), 1)
    layers = parallel.decoder_layers(actor.policy.hf_model)
    assert ["forward" in vars(layer) for layer in layers] == wrapped
    metrics, grads = step_gradients(actor, batch)
    assert metrics["train/loss"] == pytest.approx(plain[0]["train/loss"], rel=1e-6)
    for key, grad in grads.items():
        torch.testing.assert_close(grad, plain[1][key], rtol=1e-6, atol=1e-8)


def test_mesh_rejects_a_tensor_parallel_size_that_does_not_divide():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 3"):
        parallel.build_mesh(4, 3, "cpu")


def test_tensor_parallel_needs_ranks(tiny):
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 does not divide the 1"):
        TrainActor(policy_config(tiny, ["--tensor-model-parallel-size", "2"]), RankInfo(),
                   str(tiny / "model"), 1)


# ---- GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_one_gpu_runs_bf16_on_float32_masters(tiny, tmp_path):
    """One GPU trains the plain model in bfloat16 (so the residual stream is bfloat16)
    with float32 master weights and Adam moments beside it; the step's loss is the
    float32 one to bf16 accuracy, and checkpoints and weight sync carry the masters."""
    batch = prepared_batch(tiny)
    expected, _ = step_gradients(TrainActor(policy_config(tiny, []), RankInfo(),
                                            str(tiny / "model"), 1), batch)
    actor = TrainActor(policy_config(tiny, []), RankInfo(device=torch.device("cuda")),
                       str(tiny / "model"), 1)
    assert actor.mesh is None
    seen = {}  # the final norm (not compiled) sees the layers' residual stream
    actor.policy.hf_model.base_model.norm.register_forward_hook(
        lambda module, args, output: seen.update(weight=module.weight.dtype,
                                                 residual=args[0].dtype))
    (metrics,) = actor.train(batch)
    assert seen == {"weight": torch.bfloat16, "residual": torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in actor.policy.parameters())
    moments = [s["exp_avg"] for s in actor.optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert metrics["train/loss"] == pytest.approx(expected["train/loss"], rel=2e-2, abs=2e-3)
    masters = dict(actor.masters.named_masters())
    pushed = dict(actor.named_weights())
    assert pushed.keys() == masters.keys()
    assert all(t.dtype == torch.float32 and torch.equal(t, masters[n]) for n, t in pushed.items())
    actor.export_hf(tmp_path / "model")
    saved = {}
    for shard in (tmp_path / "model").glob("*.safetensors"):
        saved.update(load_file(shard))
    for name, master in masters.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 GPUs")
def test_two_gpus_match_one_process_in_bf16(tiny, tmp_path):
    """The NCCL path: data, tensor and sequence parallel on 2 GPUs give the float32
    one-process step to bfloat16 accuracy, and resume exactly."""
    batch = prepared_batch(tiny)
    write_teacher(tiny, tmp_path / "teacher")
    mp.spawn(_worker, args=(free_port(), tiny, batch, tmp_path, "cuda"), nprocs=WORLD)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    for name, (_, extra) in RUNS.items():
        reference = TrainActor(policy_config(tiny, single_process_flags(extra)), RankInfo(),
                               str(tiny / "model"), 2)
        expected_metrics, expected_grads = step_gradients(reference, batch)
        metrics, grads = results[name]
        assert metrics["train/loss"] == pytest.approx(expected_metrics["train/loss"],
                                                      rel=2e-2, abs=2e-3), name
        for key, grad in grads.items():
            error = (grad.cpu() - expected_grads[key]).norm() / expected_grads[key].norm()
            assert error < 5e-2, (name, key, float(error))
    resume = results["resume"]
    assert resume["resumed"]["train/loss"] == pytest.approx(resume["next"]["train/loss"],
                                                            rel=1e-5)
