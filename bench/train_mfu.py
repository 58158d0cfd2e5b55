"""Training throughput of one policy-loss step on one GPU, vs a plain HF forward/backward.

    python bench/train_mfu.py [--model qwen3-1.7b] [--tokens 8192 16384]
        [--furlong-flags "--recompute-granularity full ..."] [--baselines [hf hf_liger]]
    python bench/train_mfu.py --model qwen3-30b-a3b --layers 4 --tokens 8192 --micro-batches 4

The MoE model (`--model qwen3-30b-a3b`) has Qwen3-30B-A3B's layer shape (128 experts,
top-8) with `--layers` of its 48 layers; its FLOPs count the experts a token is routed
to (furlong/train/flops.py). Its optimizer step walks every expert (10x the active
parameters), so a step of one micro-batch measures mostly AdamW; RL steps hold many
(`--micro-batches`: micro-batches of `tokens` per optimizer step, 1 by default).

furlong: TrainActor, packed micro-batches of `tokens` tokens (dynamic batching), bf16
weights with float32 masters, compiled decoder layers, varlen flash attention, the fused
log-prob head, AdamW.
Each figure is the median of 5 timed steps after 2 warm-up steps.
Baselines: the HF model's own forward (SDPA) with labels and loss.backward() on the same
tokens as equal-length rows, same autocast and optimizer ("hf"); and HF with bf16
parameters and Liger-Kernel's fused kernels (RMSNorm, SwiGLU, RoPE, fused linear
cross-entropy; "hf_liger", when the wheel is installed). Peak memory per configuration.
MFU = counted FLOPs (bench-independent formula in furlong/train/flops.py, 3x forward,
response-only output projection) over time over the card's dense bf16 peak. Writes
$OUT/train_mfu_MODEL_TOKENS.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (QWEN3_MOE_SHAPES, device_name, matmul_flops,  # noqa: E402
                          qwen3_model, qwen3_moe_model, save_model_dir, synthetic_tokenizer,
                          write_results)
from furlong.config import load_config  # noqa: E402
from furlong.train.actor import RankInfo, TrainActor  # noqa: E402
from furlong.train.batch import TrainBatch  # noqa: E402
from furlong.train.flops import forward_flops, peak_flops  # noqa: E402

SAMPLE, PROMPT = 1024, 256  # tokens per sample, of which prompt
PROFILES: dict[int, str] = {}  # tokens -> CUDA kernel table of one furlong step


def synthetic_batch(num_samples: int) -> TrainBatch:
    response = SAMPLE - PROMPT
    return TrainBatch(
        tokens=[torch.randint(1, 150000, (SAMPLE,)) for _ in range(num_samples)],
        response_lengths=[response] * num_samples,
        loss_masks=[torch.ones(response) for _ in range(num_samples)],
        rewards=torch.zeros(num_samples),
        advantages=[torch.randn(1).expand(response).clone() for _ in range(num_samples)])


STEP_TIMES: dict[str, list[float]] = {}  # label -> every timed step, for the JSON


def timed(fn, warmup: int = 2, repeats: int = 5, label: str | None = None) -> float:
    """Median seconds of `repeats` calls after `warmup` (first calls compile and tune)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if label:
        STEP_TIMES[label] = times
    return statistics.median(times)


def furlong_actor(model_dir: Path, tokens: int, micro_batches: int,
                  *flags: str) -> TrainActor:
    """furlong's trainer on the first GPU, steps of `micro_batches` micro-batches of
    `tokens` tokens."""
    config, _ = load_config([
        "--hf-checkpoint", str(model_dir),
        "--rollout-batch-size", str(micro_batches * tokens // SAMPLE),
        "--rollout-max-response-len", "1", "--num-rollout", "0", "--rm-type", "random",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(tokens), "--lr", "1e-6",
        *flags])
    return TrainActor(config, RankInfo(device=torch.device("cuda")), str(model_dir), 100)


def bench_furlong(model_dir: Path, tokens: int, micro_batches: int, *flags: str) -> float:
    actor = furlong_actor(model_dir, tokens, micro_batches, *flags)
    batch = synthetic_batch(micro_batches * tokens // SAMPLE)
    seconds = timed(lambda: actor.train(batch), label=f"furlong_{tokens}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        actor.train(batch)
        torch.cuda.synchronize()
    PROFILES[tokens] = profile.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                                     max_name_column_width=90)
    return seconds


def bench_hf(model_dir: Path, tokens: int, micro_batches: int) -> float:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    ids = torch.randint(1, 150000, (tokens // SAMPLE, SAMPLE), device="cuda")

    def step():
        for _ in range(micro_batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, label=f"hf_{tokens}")


def bench_hf_liger(model_dir: Path, tokens: int, micro_batches: int) -> float:
    from liger_kernel.transformers import monkey_patch
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](
        rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True,
        cross_entropy=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    ids = torch.randint(1, 150000, (tokens // SAMPLE, SAMPLE), device="cuda")

    def step():
        for _ in range(micro_batches):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, label=f"hf_liger_{tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-1.7b")
    parser.add_argument("--layers", type=int, help="MoE model: this many of its layers")
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192, 16384])
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches of --tokens per optimizer step")
    parser.add_argument("--furlong-flags", default="", help="extra train.py flags")
    parser.add_argument("--baselines", nargs="*", default=["hf", "hf_liger"],
                        choices=["hf", "hf_liger"], help="none: furlong alone")
    args = parser.parse_args()
    flags = args.furlong_flags.split()
    name = device_name()
    results = {"device": name, "torch": torch.__version__, "model": args.model,
               "layers": args.layers, "micro_batches": args.micro_batches,
               "furlong_flags": args.furlong_flags,
               "measured_bf16_gemm_tflops": matmul_flops() / 1e12, "runs": []}
    peak = peak_flops(name)
    with tempfile.TemporaryDirectory() as temporary:
        if args.model in QWEN3_MOE_SHAPES:  # built on the GPU: minutes faster than the CPU
            model = qwen3_moe_model(args.model, args.layers, torch.bfloat16, "cuda")
        else:  # saved in bf16: half the bytes
            model = qwen3_model(args.model, torch.bfloat16, "cpu")
        config = model.config
        model_dir = save_model_dir(model, Path(temporary) / "model", synthetic_tokenizer())
        del model
        torch.cuda.empty_cache()
        for tokens in args.tokens:
            steps = args.micro_batches
            samples = steps * tokens // SAMPLE
            flops = 3 * forward_flops(config, [SAMPLE] * samples, [SAMPLE - PROMPT] * samples)
            run = {"tokens": tokens}
            benches = {"furlong": lambda: bench_furlong(model_dir, tokens, steps, *flags)}
            baselines = {"hf": lambda: bench_hf(model_dir, tokens, steps),
                         "hf_liger": lambda: bench_hf_liger(model_dir, tokens, steps)}
            benches.update({label: baselines[label] for label in args.baselines})
            for label, bench in benches.items():
                torch.cuda.reset_peak_memory_stats()
                try:
                    seconds = bench()
                except (torch.OutOfMemoryError, ImportError) as error:
                    run[label] = {"error": f"{type(error).__name__}: {str(error)[:120]}"}
                    continue
                finally:  # the model and optimizer of the run are gone
                    torch.cuda.empty_cache()
                run[label] = {"seconds": seconds, "tokens_per_s": steps * tokens / seconds,
                              "tflops": flops / seconds / 1e12,
                              "mfu": flops / seconds / peak if peak else None,
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            run["furlong_profile"] = PROFILES.get(tokens)
            run["step_times"] = dict(STEP_TIMES)
            STEP_TIMES.clear()
            results["runs"].append(run)
            write_results(f"train_mfu_{args.model}_{'-'.join(map(str, args.tokens))}", results)
    for run in results["runs"]:
        print({k: v for k, v in run.items() if k != "furlong_profile"})
    print(PROFILES.get(args.tokens[0], ""))


if __name__ == "__main__":
    main()
