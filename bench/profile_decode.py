"""Where a decode step's time goes: attention kernel variants, full step, top kernels.

    python bench/profile_decode.py [--model qwen3-0.6b] [--batch 256] [--context 256]

Writes $OUT/profile_decode.json and prints a summary.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (copy_bandwidth, device_name, kv_bytes_per_token, param_bytes,  # noqa: E402
                          qwen3_model, synthetic_tokenizer, write_results)
from furlong.engine.base import SamplingParams  # noqa: E402
from furlong.engine.fast.block_manager import BlockManager  # noqa: E402
from furlong.engine.fast.kernels import decode_splits, paged_decode_attention  # noqa: E402
from furlong.engine.fast.runner import ModelRunner  # noqa: E402
from furlong.engine.fast.scheduler import Scheduler  # noqa: E402
from furlong.engine.fast.sequence import Sequence  # noqa: E402


def cuda_time(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


def attention_variants(batch: int, context: int, block_size: int, bandwidth: float) -> list:
    kv_heads, heads, dim, layers = 8, 16, 128, 1
    blocks = batch * (context // block_size + 1) + 1
    k_cache = torch.randn(blocks, block_size, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    per_seq = context // block_size + 1
    tables = (torch.randperm(blocks - 1, device="cuda")[:batch * per_seq] + 1).view(
        batch, per_seq).int()
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
    floor = 2 * batch * context * kv_heads * dim * 2 * layers / bandwidth
    results = []
    for tile in (16, 32, 64, 128):
        for warps in (4, 8):
            for stages in (1, 2, 3):
                for splits in sorted({1, 2, decode_splits(batch, kv_heads)}):
                    try:
                        seconds = cuda_time(lambda: paged_decode_attention(
                            query, k_cache, v_cache, tables, lengths, 0.08, splits, tile,
                            warps, stages))
                    except Exception as error:  # a config the compiler rejects
                        results.append({"tile": tile, "warps": warps, "stages": stages,
                                        "splits": splits, "error": str(error)[:200]})
                        continue
                    results.append({"tile": tile, "warps": warps, "stages": stages,
                                    "splits": splits, "us": seconds * 1e6,
                                    "fraction_of_bandwidth": floor / seconds})
    return results


def steady_runner(model, batch: int, context: int, block_size: int):
    """A runner holding `batch` sequences whose context is `context` tokens."""
    tokenizer = synthetic_tokenizer()
    blocks = BlockManager(batch * (context // block_size + 4) + 8, block_size)
    runner = ModelRunner(model, {tokenizer.eos_token_id}, block_size=block_size,
                         num_blocks=len(blocks.ref_counts), max_num_seqs=batch,
                         max_model_len=4096, cuda_graphs=True)
    scheduler = Scheduler(blocks, batch, 1 << 20)
    for i in range(batch):
        prompt = torch.randint(1, 150000, (context,)).tolist()
        scheduler.add(Sequence(prompt, SamplingParams(max_new_tokens=1 << 20, ignore_eos=True),
                               i, 1 << 20, lambda s: None))
    groups = scheduler.admit()
    runner.admit(groups)
    for seq in scheduler.running:
        seq.num_generated = 1
    return runner, scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    results = {"device": device_name(), "bandwidth_tb_s": bandwidth / 1e12, **vars(args)}
    results["attention"] = attention_variants(args.batch, args.context, args.block_size,
                                              bandwidth)
    write_results("profile_decode", results)

    model = qwen3_model(args.model)
    runner, scheduler = steady_runner(model, args.batch, args.context, args.block_size)
    window = 8
    copies = scheduler.reserve_window(window, lambda s: None)
    runner.copy_blocks(copies)
    runner.sync_tables(scheduler.running)
    weights = param_bytes(model)
    kv = args.batch * (args.context + window / 2) * kv_bytes_per_token(model.config)
    results["step_floor_us"] = (weights + kv) / bandwidth * 1e6
    runner.capture_graphs()
    seqs = list(scheduler.running)
    start = time.perf_counter()
    runner.decode_window(seqs, window)
    results["window_wall_us_per_step"] = (time.perf_counter() - start) / window * 1e6
    graph = runner.graphs[(next(b for b in runner.buckets if b >= len(seqs)), False)]
    results["graph_replay_us"] = cuda_time(graph.replay, repeats=8) * 1e6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner._decode_step(next(b for b in runner.buckets if b >= len(seqs)), False)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    results["top_kernels"] = table
    write_results("profile_decode", results)
    best = min((r for r in results["attention"] if "us" in r), key=lambda r: r["us"])
    print(f"{results['device']}  copy {bandwidth / 1e12:.2f} TB/s")
    print(f"attention best: {best}")
    print(f"decode step floor {results['step_floor_us']:.0f} us, graph replay "
          f"{results['graph_replay_us']:.0f} us, window wall per step "
          f"{results['window_wall_us_per_step']:.0f} us")
    print(table)


if __name__ == "__main__":
    main()
