"""Rollout throughput of the fast engine vs HF `generate` and vs the HBM roofline.

    python bench/rollout.py [--models qwen3-0.6b qwen3-1.7b] [--skip-hf]

Runs (random-init bf16 models, EOS ignored):
  uniform     256 sequences, 128-token prompts, 256 new tokens (also through HF generate)
  rl-shaped   64 prompts x 8 samples, prompts 64-1024 tokens, response lengths long-tailed
              (log-normal, capped at 4096)
Roofline: per decode step, the bytes of the weights plus the KV of every running
sequence, over the copy bandwidth measured in this call. Also checks correctness on the
GPU: log-probs of the engine against the trainer's recomputation (bf16).
Writes $OUT/rollout.json and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (copy_bandwidth, device_name, kv_bytes_per_token, param_bytes,  # noqa: E402
                          qwen3_model, synthetic_tokenizer, write_results)
from furlong.engine.base import SamplingParams  # noqa: E402
from furlong.engine.fast import FastEngine  # noqa: E402


def uniform_workload(seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, 150000) for _ in range(128)], 256) for _ in range(256)]


def rl_workload(seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    requests = []
    for _ in range(64):
        prompt = [rng.randrange(1, 150000) for _ in range(rng.randint(64, 1024))]
        for _ in range(8):
            length = min(4096, max(16, int(rng.lognormvariate(6.0, 1.0))))
            requests.append((prompt, length))
    return requests


def roofline_tokens_per_second(workload, weights: int, kv_per_token: int,
                               bandwidth: float) -> float:
    """Tokens over the time to read, at every decode step, weights + all running KV."""
    steps = max(n for _, n in workload)
    seconds = 0.0
    for step in range(steps):
        running = [(len(p), n) for p, n in workload if n > step]
        kv = sum(prompt + step for prompt, _ in running) * kv_per_token
        seconds += (weights + kv) / bandwidth
    return sum(n for _, n in workload) / seconds


async def run_engine(engine, workload, seed: int = 0) -> tuple[float, int, list]:
    start = time.perf_counter()
    outputs = await asyncio.gather(*(engine.generate(prompt, SamplingParams(
        temperature=1.0, max_new_tokens=n, ignore_eos=True, sampling_seed=seed + i))
        for i, (prompt, n) in enumerate(workload)))
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.output_ids) for o in outputs), outputs


def hf_generate(model, workload) -> tuple[float, int]:
    prompts = torch.tensor([p for p, _ in workload], device="cuda")
    new = workload[0][1]
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                  top_k=0, top_p=1.0, pad_token_id=0)
    model.generate(prompts[:8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, (out.shape[1] - prompts.shape[1]) * out.shape[0]


def logprob_agreement(model, outputs, workload, samples: int = 16) -> float:
    """Mean |engine log-prob - trainer log-prob| over response tokens (bf16 both)."""
    from furlong.sample import Sample
    from furlong.train.batch import TrainBatch, pack
    from furlong.train.policy import CausalLMPolicy
    chosen = [Sample(tokens=list(p) + o.output_ids, response_length=len(o.output_ids),
                     rollout_log_probs=o.output_log_probs, reward=0.0)
              for (p, _), o in list(zip(workload, outputs, strict=True))[:samples]]
    batch = TrainBatch.from_samples(chosen, None)
    policy = CausalLMPolicy(model)
    from furlong.model.attention import register
    model.config._attn_implementation = register()
    diffs = []
    with torch.no_grad():
        for i in range(len(chosen)):
            micro = pack(batch, [i], "cuda")
            log_probs, _ = policy(micro, 1.0)
            diffs.append((log_probs.cpu() - batch.rollout_log_probs[i]).abs())
    model.config._attn_implementation = "sdpa"
    return float(torch.cat(diffs).mean())


def bench_model(name: str, bandwidth: float, skip_hf: bool, block_size: int) -> dict:
    model = qwen3_model(name)
    tokenizer = synthetic_tokenizer()
    weights, kv_token = param_bytes(model), kv_bytes_per_token(model.config)
    result = {"model": name, "weights_gb": weights / 1e9, "kv_bytes_per_token": kv_token,
              "block_size": block_size}
    engine = FastEngine(model, tokenizer, max_num_seqs=512, block_size=block_size,
                        mem_fraction_static=0.85)
    start = time.perf_counter()
    engine.runner.capture_graphs()
    result["graph_capture_s"] = time.perf_counter() - start
    asyncio.run(run_engine(engine, uniform_workload(1)[:32]))  # warm up kernels
    for label, workload in (("uniform", uniform_workload()), ("rl_shaped", rl_workload())):
        seconds, tokens, outputs = asyncio.run(run_engine(engine, workload))
        roof = roofline_tokens_per_second(workload, weights, kv_token, bandwidth)
        result[label] = {"seconds": seconds, "output_tokens": tokens,
                         "tokens_per_s": tokens / seconds, "roofline_tokens_per_s": roof,
                         "fraction_of_roofline": tokens / seconds / roof,
                         "preempted": engine.scheduler.num_preempted}
        if label == "uniform":
            result[label]["logprob_mean_abs_diff_vs_trainer"] = logprob_agreement(
                model, outputs, workload)
    asyncio.run(engine.close())
    del engine
    torch.cuda.empty_cache()
    if not skip_hf:
        seconds, tokens = hf_generate(model, uniform_workload())
        result["uniform"]["hf_generate_tokens_per_s"] = tokens / seconds
        result["uniform"]["speedup_vs_hf"] = result["uniform"]["tokens_per_s"] / (tokens / seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b"])
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[16])
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    results = {"device": device_name(), "torch": torch.__version__,
               "copy_bandwidth_tb_s": bandwidth / 1e12, "runs": []}
    for name in args.models:
        for i, block_size in enumerate(args.block_sizes):  # HF generate once per model
            results["runs"].append(bench_model(name, bandwidth, args.skip_hf or i > 0,
                                               block_size))
            write_results("rollout", results)
    print(f"{results['device']}  copy {bandwidth / 1e12:.2f} TB/s")
    print(f"{'model':<12} {'block':>5} {'run':<10} {'tok/s':>9} {'roofline':>9} {'frac':>6} "
          f"{'HF tok/s':>9} {'x HF':>6}")
    for run in results["runs"]:
        for label in ("uniform", "rl_shaped"):
            r = run[label]
            print(f"{run['model']:<12} {run['block_size']:>5} {label:<10} "
                  f"{r['tokens_per_s']:>9.0f} {r['roofline_tokens_per_s']:>9.0f} "
                  f"{r['fraction_of_roofline']:>6.2f} {r.get('hf_generate_tokens_per_s', 0):>9.0f} "
                  f"{r.get('speedup_vs_hf', 0):>6.1f}")
        print(f"  logprob |engine - trainer| mean: "
              f"{run['uniform']['logprob_mean_abs_diff_vs_trainer']:.4f}")


if __name__ == "__main__":
    main()
