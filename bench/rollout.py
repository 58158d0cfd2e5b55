"""Rollout throughput of the fast engine vs HF `generate` and vs the HBM roofline.

    python bench/rollout.py [--models qwen3-0.6b qwen3-1.7b] [--skip-hf]
    python bench/rollout.py --models --moe-models qwen3-30b-a3b   # the MoE run only
    python bench/rollout.py --models --cpu-check   # the MoE run's code paths on the CPU

Runs (random-init bf16 models, EOS ignored):
  uniform     256 sequences, 128-token prompts, 256 new tokens (also through HF generate)
  rl-shaped   64 prompts x 8 samples, prompts 64-1024 tokens, response lengths long-tailed
              (log-normal, capped at 4096)
  moe         Qwen3-30B-A3B's layer shape, fewer layers: B sequences of 128-token prompts,
              128 new tokens, for each B in --moe-batches (HF generate at --moe-hf-batches)
Roofline: per decode step, the bytes of the weights plus the KV of every running
sequence, over the copy bandwidth measured in this call. For MoE models the weights are
those a step touches: per layer, the experts that the step's tokens were routed to (from
the engine's routed experts) plus everything that is not an expert (attention, norms,
routers, the output head). Also checks correctness on the GPU: log-probs of the engine
against the trainer's recomputation (bf16, dense models).
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
                          qwen3_model, qwen3_moe_model, synthetic_tokenizer, write_results)
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


async def run_engine(engine, workload, seed: int = 0, routes: bool = False
                     ) -> tuple[float, int, list]:
    start = time.perf_counter()
    outputs = await asyncio.gather(*(engine.generate(prompt, SamplingParams(
        temperature=1.0, max_new_tokens=n, ignore_eos=True, sampling_seed=seed + i),
        return_routed_experts=routes) for i, (prompt, n) in enumerate(workload)))
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.output_ids) for o in outputs), outputs


def hf_generate(model, workload) -> tuple[float, int]:
    prompts = torch.tensor([p for p, _ in workload], device=model.device)
    new = workload[0][1]
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                  top_k=0, top_p=1.0, pad_token_id=0)
    model.generate(prompts[:8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    synchronize(model.device)
    start = time.perf_counter()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    synchronize(model.device)
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


# ---- MoE: Qwen3-30B-A3B's layer shape -------------------------------------------------------
def moe_workload(batch: int, prompt_len: int = 128, new_tokens: int = 128,
                 seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, 150000) for _ in range(prompt_len)], new_tokens)
            for _ in range(batch)]


def expert_bytes(model) -> tuple[int, int]:
    """(bytes of one expert of one layer, bytes of all experts of the model)."""
    experts = [layer.mlp.experts for layer in model.model.layers
               if hasattr(layer.mlp, "experts")]
    one = sum(p[0].numel() * p.element_size()
              for p in (experts[0].gate_up_proj, experts[0].down_proj))
    return one, one * experts[0].gate_up_proj.shape[0] * len(experts)


def moe_roofline_tokens_per_second(model, workload, outputs, bandwidth: float) -> dict:
    """Tokens over the time to read, at every decode step, what that step touches: the
    distinct experts its tokens were routed to in each layer, every weight that is not
    an expert (input embedding rows aside), and the KV of each sequence.

    Step s makes token s of every sequence from the token at position P - 1 + s (P the
    prompt length; step 0 is the prefill's last position), over P + s tokens of KV."""
    prompt_len = len(workload[0][0])
    routes = torch.stack([o.routed_experts[prompt_len - 1:] for o in outputs])  # (B, S, L, k)
    batch, steps, layers, top_k = routes.shape
    num_experts = model.config.num_experts
    ids = routes.permute(1, 2, 0, 3).reshape(steps, layers, batch * top_k).long()
    touched = torch.zeros(steps, layers, num_experts).scatter_(2, ids, 1.0).sum(-1)  # (S, L)
    one_expert, all_experts = expert_bytes(model)
    embedding = 0 if model.config.tie_word_embeddings else \
        model.get_input_embeddings().weight.numel() * model.dtype.itemsize
    other = param_bytes(model) - all_experts - embedding
    kv = kv_bytes_per_token(model.config) * batch * (prompt_len + torch.arange(steps))
    step_bytes = touched.sum(1) * one_expert + other + kv  # (S,)
    seconds = float((step_bytes / bandwidth).sum())
    return {"roofline_tokens_per_s": batch * steps / seconds,
            "experts_touched_per_layer": float(touched.mean()),
            "bytes_per_step_gb": float(step_bytes.mean()) / 1e9}


def bench_moe(name: str, num_layers: int, batches: list[int], hf_batches: list[int],
              bandwidth: float, device: str) -> dict:
    model = qwen3_moe_model(name, num_layers, device=device)
    one_expert, all_experts = expert_bytes(model)
    result = {"model": f"{name} ({num_layers} layers)", "weights_gb": param_bytes(model) / 1e9,
              "expert_mb": one_expert / 1e6, "experts_gb": all_experts / 1e9,
              "hf_experts_implementation": getattr(model.config, "_experts_implementation", None),
              "batches": {}}
    engine = FastEngine(model, synthetic_tokenizer(), max_num_seqs=max(batches),
                        mem_fraction_static=0.85, kv_cache_tokens=None if device == "cuda"
                        else 2 * max(batches) * 256)
    start = time.perf_counter()
    engine.runner.capture_graphs()
    result["graph_capture_s"] = time.perf_counter() - start
    asyncio.run(run_engine(engine, moe_workload(min(batches), seed=1)))  # warm up kernels
    for batch in batches:
        workload = moe_workload(batch)
        seconds, tokens, outputs = asyncio.run(run_engine(engine, workload, routes=True))
        run = {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
               **moe_roofline_tokens_per_second(model, workload, outputs, bandwidth)}
        run["fraction_of_roofline"] = run["tokens_per_s"] / run["roofline_tokens_per_s"]
        result["batches"][batch] = run
    asyncio.run(engine.close())
    engine.runner.release()
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    for batch in hf_batches:
        seconds, tokens = hf_generate(model, moe_workload(batch))
        run = result["batches"].setdefault(batch, {})
        run["hf_generate_tokens_per_s"] = tokens / seconds
        if "tokens_per_s" in run:
            run["speedup_vs_hf"] = run["tokens_per_s"] / run["hf_generate_tokens_per_s"]
    return result


def print_moe(result: dict) -> None:
    print(f"{result['model']}: {result['weights_gb']:.1f} GB, experts "
          f"{result['experts_gb']:.1f} GB, HF experts: {result['hf_experts_implementation']}")
    print(f"{'batch':>5} {'tok/s':>9} {'roofline':>9} {'frac':>6} {'experts/layer':>13} "
          f"{'HF tok/s':>9} {'x HF':>6}")
    for batch, r in result["batches"].items():
        print(f"{batch:>5} {r.get('tokens_per_s', 0):>9.0f} "
              f"{r.get('roofline_tokens_per_s', 0):>9.0f} "
              f"{r.get('fraction_of_roofline', 0):>6.2f} "
              f"{r.get('experts_touched_per_layer', 0):>13.1f} "
              f"{r.get('hf_generate_tokens_per_s', 0):>9.0f} {r.get('speedup_vs_hf', 0):>6.1f}")


def cpu_check() -> None:
    """The MoE run end to end on the CPU (tiny shape, nominal bandwidth): code paths only."""
    result = bench_moe("qwen3-moe-tiny", 2, [2, 4], [4], 1e12, "cpu")
    print_moe(result)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=["qwen3-0.6b", "qwen3-1.7b"])
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[16])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--moe-models", nargs="*", default=[],
                        help="MoE layer shapes to run (qwen3-30b-a3b); none by default")
    parser.add_argument("--moe-layers", type=int, default=8,
                        help="layers of the MoE model (Qwen3-30B-A3B has 48)")
    parser.add_argument("--moe-batches", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--moe-hf-batches", nargs="*", type=int, default=[64, 256])
    parser.add_argument("--cpu-check", action="store_true",
                        help="only the MoE run, on the tiny MoE shape, on the CPU")
    args = parser.parse_args()
    if args.cpu_check:
        return cpu_check()
    bandwidth = copy_bandwidth()
    results = {"device": device_name(), "torch": torch.__version__,
               "copy_bandwidth_tb_s": bandwidth / 1e12, "runs": [], "moe_runs": []}
    for name in args.moe_models:
        results["moe_runs"].append(bench_moe(
            name, args.moe_layers, args.moe_batches, [] if args.skip_hf else args.moe_hf_batches,
            bandwidth, "cuda"))
        write_results("rollout", results)
        print_moe(results["moe_runs"][-1])
    for name in args.models:
        for i, block_size in enumerate(args.block_sizes):  # HF generate once per model
            results["runs"].append(bench_model(name, bandwidth, args.skip_hf or i > 0,
                                               block_size))
            write_results("rollout", results)
    print(f"{results['device']}  copy {bandwidth / 1e12:.2f} TB/s")
    if not results["runs"]:
        return
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
