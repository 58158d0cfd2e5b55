"""How far the trainer's log-probs are from the engine's on an MoE model, with and without
routing replay (issue 13, item 6).

    python bench/routing_replay.py [--layers 4] [--prompts 64] [--prompt-len 128]
        [--new-tokens 128]
    python bench/routing_replay.py --cpu-check   # the tiny MoE, HF engine, on the CPU

Model: random-init Qwen3-MoE of Qwen3-30B-A3B's layer shape (128 experts, top-8) with
`--layers` of its 48 layers, bf16, saved to a temporary directory. The fast engine samples
`--new-tokens` tokens (temperature 1, EOS ignored) after each of `--prompts` random prompts
of `--prompt-len` tokens, returning its log-probs and the experts of every token. The
trainer (TrainActor on one GPU: bf16 weights cast from float32 masters, compiled layers,
varlen attention) then computes the log-probs of the same tokens twice:
  without replay  its routers choose (what the trainer does without the replay flags)
  with replay     the engine's routes are replayed (`TrainBatch.routed_experts`, what
                  --use-rollout-routing-replay gives every forward)
For each: train/train_rollout_logprob_abs_diff and train/train_rollout_kl over the response
tokens, computed by the objective's own function (objective.rollout_correction), and the
share of the engine's routed experts (every token but the last, every layer) missing from
the trainer's, whose routes are recorded by the old-log-prob forward of
--use-routing-replay. With replay that share is 0 (`replay_in_effect`).

--cpu-check: the same code paths on the tiny MoE shape (2 layers, 8 prompts of 16 tokens,
16 new tokens, the size flags ignored), the HF engine in bf16 against the trainer in
float32, as tests/test_routing_replay.py makes the engine and the trainer disagree.
Writes $OUT/routing_replay.json and prints one line.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (device_name, qwen3_moe_model, save_model_dir,  # noqa: E402
                          synthetic_tokenizer, write_results)
from furlong.config import load_config  # noqa: E402
from furlong.config.groups import GrpoArgs  # noqa: E402
from furlong.engine.base import GenerateOutput, SamplingParams  # noqa: E402
from furlong.train.actor import RankInfo, TrainActor  # noqa: E402
from furlong.train.batch import TrainBatch  # noqa: E402
from furlong.train.objective import rollout_correction  # noqa: E402
from furlong.train.rl_step import timed  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """What one run measures: `prompts` random prompts of `prompt_len` tokens, each given
    `new_tokens` new tokens, on `layers` layers of the `model` shape (bench/common.py)."""
    model: str
    layers: int
    prompts: int
    prompt_len: int
    new_tokens: int
    device: str


def cpu_check_workload() -> Workload:
    return Workload("qwen3-moe-tiny", 2, 8, 16, 16, "cpu")


# ---- the engine's rollout -------------------------------------------------------------------
def random_prompts(work: Workload, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 150000) for _ in range(work.prompt_len)]
            for _ in range(work.prompts)]


def build_engine(model, tokenizer, work: Workload):
    """The fast engine on the GPU (KV for this workload only: the trainer comes next), the
    HF engine on the CPU."""
    if work.device == "cuda":
        from furlong.engine.fast import FastEngine
        return FastEngine(model, tokenizer, max_num_seqs=work.prompts,
                          kv_cache_tokens=2 * work.prompts * (work.prompt_len + work.new_tokens))
    from furlong.engine.hf_engine import HFEngine
    return HFEngine(model, tokenizer)


def rollout(model_dir: Path, work: Workload, prompts: list[list[int]]) -> list[GenerateOutput]:
    """Saves the model to `model_dir` and generates with its routes; frees the engine."""
    model = qwen3_moe_model(work.model, work.layers, torch.bfloat16, work.device)
    tokenizer = synthetic_tokenizer()
    save_model_dir(model, model_dir, tokenizer)
    engine = build_engine(model, tokenizer, work)
    params = SamplingParams(temperature=1.0, max_new_tokens=work.new_tokens, ignore_eos=True)
    outputs = asyncio.run(generate_and_close(engine, prompts, params))
    del engine, model
    if work.device == "cuda":
        torch.cuda.empty_cache()
    return outputs


async def generate_and_close(engine, prompts: list[list[int]],
                             params: SamplingParams) -> list[GenerateOutput]:
    """Every prompt at once, sample i seeded with i, routes returned; then the engine's
    memory is released and it stops."""
    outputs = await asyncio.gather(*(engine.generate(
        prompt, replace(params, sampling_seed=i), return_routed_experts=True)
        for i, prompt in enumerate(prompts)))
    await engine.release_memory()
    await engine.close()
    return outputs


def rollout_batch(prompts: list[list[int]], outputs: list[GenerateOutput]) -> TrainBatch:
    return TrainBatch(
        tokens=[torch.tensor(p + o.output_ids) for p, o in zip(prompts, outputs, strict=True)],
        response_lengths=[len(o.output_ids) for o in outputs],
        loss_masks=[torch.ones(len(o.output_ids)) for o in outputs],
        rewards=torch.zeros(len(outputs)),
        rollout_log_probs=[torch.tensor(o.output_log_probs) for o in outputs])


# ---- the trainer ----------------------------------------------------------------------------
def build_trainer(model_dir: Path, work: Workload) -> TrainActor:
    """One-process trainer; --use-routing-replay makes compute_log_probs record the routes
    its forward used (actor.recorded_routes)."""
    sample = work.prompt_len + work.new_tokens
    config, _ = load_config([
        "--hf-checkpoint", str(model_dir), "--rollout-batch-size", str(work.prompts),
        "--rollout-max-response-len", str(work.new_tokens), "--rollout-temperature", "1.0",
        "--num-rollout", "0", "--rm-type", "random", "--use-dynamic-batch-size",
        "--max-tokens-per-gpu", str(max(sample, 16384)), "--use-routing-replay"])
    return TrainActor(config, RankInfo(device=torch.device(work.device)), str(model_dir), 1)


def trainer_pass(actor: TrainActor, batch: TrainBatch,
                 engine_routes: list[torch.Tensor]) -> dict:
    """The trainer's log-probs of `batch` (replaying batch.routed_experts, if it has them)
    against the engine's, and the routes its forward used against `engine_routes`."""
    log_probs, _ = actor.compute_log_probs(batch)
    trainer_routes, actor.recorded_routes = actor.recorded_routes, None
    return {**rollout_gap(actor.config.grpo, log_probs, batch.rollout_log_probs),
            **route_disagreement(engine_routes, trainer_routes)}


def rollout_gap(grpo: GrpoArgs, trainer: list[torch.Tensor],
                engine: list[torch.Tensor]) -> dict:
    """train/train_rollout_logprob_abs_diff and train/train_rollout_kl as the objective
    computes them, every response token weighted alike (responses are all equally long,
    so this is also the per-sample mean that training logs by default)."""
    trainer_all, engine_all = torch.cat(trainer), torch.cat(engine)
    zeros = torch.zeros_like(trainer_all)  # token loss and policy KL: only TIS reads them
    _, metrics, _ = rollout_correction(grpo, zeros, trainer_all, engine_all, zeros,
                                       micro=None, reduce=torch.mean, hook_args=None)
    return {f"train/{name}": float(value) for name, value in metrics.items()}


def route_disagreement(engine: list[torch.Tensor], trainer: list[torch.Tensor]) -> dict:
    """Per sample (L - 1, layers, k) routes of both. experts_differ: the share of the
    engine's (token, layer, expert) choices that the trainer did not make for that token
    and layer (the order within the top-k aside); token_layers_differ: the share of
    (token, layer) whose expert sets differ."""
    engine_all = torch.cat(engine).long()  # (T, layers, k)
    trainer_all = torch.cat(trainer).long()
    assert engine_all.shape == trainer_all.shape, (engine_all.shape, trainer_all.shape)
    shared = (engine_all[..., :, None] == trainer_all[..., None, :]).any(-1)  # (T, layers, k)
    return {"experts_differ": float((~shared).float().mean()),
            "token_layers_differ": float((~shared.all(-1)).float().mean())}


# ---- the run --------------------------------------------------------------------------------
def measure(work: Workload) -> dict:
    """Both trainer passes on one rollout; seconds of each phase (the first trainer pass
    compiles the layers on the GPU)."""
    prompts, seconds = random_prompts(work), {}
    with tempfile.TemporaryDirectory() as temporary:
        with timed(seconds, "rollout"):
            outputs = rollout(Path(temporary) / "model", work, prompts)
        with timed(seconds, "build_trainer"):
            actor = build_trainer(Path(temporary) / "model", work)
    engine_routes = [o.routed_experts.to("cpu", torch.int32) for o in outputs]
    batch = rollout_batch(prompts, outputs)
    results = describe(work, batch, engine_routes)
    with timed(seconds, "without_replay"):
        results["without_replay"] = trainer_pass(actor, batch, engine_routes)
    with timed(seconds, "with_replay"):
        results["with_replay"] = trainer_pass(
            actor, replace(batch, routed_experts=engine_routes), engine_routes)
    # Replay in effect: the trainer used the engine's routes (compiled layers that bake in
    # the first trace's routing would not).
    results["replay_in_effect"] = results["with_replay"]["experts_differ"] == 0
    return {**results, "seconds": seconds}


def describe(work: Workload, batch: TrainBatch, engine_routes: list[torch.Tensor]) -> dict:
    on_gpu = work.device == "cuda"
    return {"device": device_name() if on_gpu else "cpu", "torch": torch.__version__,
            **asdict(work), "engine": "fast" if on_gpu else "hf", "engine_dtype": "bfloat16",
            "trainer_dtype": "bfloat16 (float32 masters)" if on_gpu else "float32",
            "response_tokens": sum(batch.response_lengths),
            "routed_tokens": sum(len(r) for r in engine_routes),
            "top_k": engine_routes[0].shape[-1]}


def summary(results: dict) -> str:
    own, replayed = results["without_replay"], results["with_replay"]
    metric = "train/train_rollout_logprob_abs_diff"
    return (f"{results['device']}: {results['model']} x {results['layers']} layers, "
            f"{results['response_tokens']} response tokens; {metric} {own[metric]:.5f} "
            f"without replay, {replayed[metric]:.5f} with; experts differing "
            f"{own['experts_differ']:.2%} -> {replayed['experts_differ']:.2%}"
            + ("" if results["replay_in_effect"] else " (REPLAY NOT IN EFFECT)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4,
                        help="layers of the MoE model (Qwen3-30B-A3B has 48)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cpu-check", action="store_true",
                        help="the tiny MoE shape on the CPU; the size flags are ignored")
    args = parser.parse_args()
    work = cpu_check_workload() if args.cpu_check else Workload(
        "qwen3-30b-a3b", args.layers, args.prompts, args.prompt_len, args.new_tokens, "cuda")
    results = measure(work)
    write_results("routing_replay", results)
    print(summary(results))


if __name__ == "__main__":
    main()
