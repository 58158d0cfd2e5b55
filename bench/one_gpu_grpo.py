"""GRPO steps of a large model on one GPU held to an 80 GB card's memory: LoRA vs full.

    python bench/one_gpu_grpo.py --model qwen3-8b --lora-rank 32
    python bench/one_gpu_grpo.py --model qwen3-4b                  # full fine-tuning
    python bench/one_gpu_grpo.py --model qwen3-8b --flags=--optimizer-cpu-offload
    python bench/one_gpu_grpo.py --model qwen3-tiny --lora-rank 8 --cpu-check

train.py runs the whole loop in one process, the fast engine next to the trainer
(--offload-train --offload-rollout: the optimizer state leaves the GPU while the engine
generates, the engine's weights and KV cache while the trainer trains). The process's
PyTorch allocator is capped at --memory-gib (default: what torch reports for an H100
80GB), so a run on a larger card shows what fits an 80 GB one; the engine's KV cache
takes --kv-fraction of that cap. The model is random-init with the published shape
(built directly in bf16 on the GPU), the tokenizer synthetic (Qwen3's vocabulary size).

Workload: 16 prompts x 8 samples, 256-token prompts, up to 512 new tokens at
temperature 1, a random 0/1 reward, a KL loss to the reference (with LoRA: the base
with the adapter disabled; full: a second, bf16 copy), packed micro-batches of
--max-tokens 16384 with full recomputation, one AdamW step per rollout.

Reported: the step time (median over the steps after the first, which compiles) and its
phases; the allocator's peak per phase (perf/*_peak_memory_gib, furlong's own metrics);
the device's peak as nvidia-smi sees it (CUDA context, cuBLAS and Triton workspaces
included), sampled every 100 ms. Writes $OUT/one_gpu_<model>_<lora|full>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (qwen3_model_direct, save_model_dir, synthetic_tokenizer,  # noqa: E402
                          write_prompts, write_results)

H100_GIB = 79.19  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3
PROMPTS, SAMPLES, PROMPT_LEN, NEW_TOKENS = 16, 8, 256, 512
PHASES = ("perf/step_time", "perf/rollout_time", "perf/actor_train_time",
          "perf/update_weights_time", "perf/rollout_peak_memory_gib",
          "perf/train_peak_memory_gib", "perf/update_weights_peak_memory_gib",
          "train/kl_loss", "rollout/response_len/mean", "train/train_rollout_logprob_abs_diff",
          "perf/actor_train_tflops", "perf/actor_train_mfu")


def train_argv(model_dir: Path, prompts: Path, run_dir: Path, args) -> list[str]:
    tiny = args.cpu_check
    argv = ["--hf-checkpoint", str(model_dir), "--prompt-data", str(prompts),
            "--input-key", "prompt", "--rm-type", "random",
            "--rollout-batch-size", str(PROMPTS), "--n-samples-per-prompt", str(SAMPLES),
            "--rollout-max-response-len", str(16 if tiny else NEW_TOKENS),
            "--rollout-temperature", "1.0", "--global-batch-size", str(PROMPTS * SAMPLES),
            "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(args.max_tokens),
            "--use-kl-loss", "--kl-loss-coef", "0.01", "--kl-loss-type", "low_var_kl",
            "--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "1", "--offload-train", "--offload-rollout",
            "--num-rollout", str(args.steps), "--run-dir", str(run_dir)]
    if args.lora_rank:
        argv += ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank),
                 "--target-modules", "all-linear", "--lr", "1e-5"]
    else:
        argv += ["--lr", "1e-6"]
    if not tiny:
        total_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        argv += ["--sglang-mem-fraction-static",
                 f"{args.kv_fraction * min(args.memory_gib, total_gib) / total_gib:.4f}"]
    return argv + shlex.split(args.flags)


class DevicePeak:
    """The largest memory.used nvidia-smi reports while the block runs (MiB)."""

    def __enter__(self):
        self.peak_mib = 0
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
             "-i", "0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.peak_mib = max(self.peak_mib, int(line))

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait()
        self.reader.join()


def run(args, directory: Path) -> dict:
    device = "cpu" if args.cpu_check else "cuda"
    model = qwen3_model_direct(args.model, torch.bfloat16, device)
    num_params = sum(p.numel() for p in model.parameters())
    model_dir = save_model_dir(model, directory / "model", synthetic_tokenizer())
    del model
    torch.cuda.empty_cache()
    prompts = write_prompts(directory / "prompts.jsonl", PROMPTS * args.steps,
                            8 if args.cpu_check else PROMPT_LEN)
    run_dir = directory / "run"
    command = [sys.executable, str(ROOT / "bench/capped.py"), str(args.memory_gib),
               str(ROOT / "train.py"), *train_argv(model_dir, prompts, run_dir, args)]
    print(" ".join(shlex.quote(part) for part in command), flush=True)
    peak = None if args.cpu_check else DevicePeak()
    with peak or contextlib.nullcontext():
        subprocess.run(command, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_rollout = [row for row in rows if "perf/step_time" in row]
    timed = per_rollout[1:] or per_rollout
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "model": args.model, "parameters": num_params,
        "lora_rank": args.lora_rank, "memory_cap_gib": args.memory_gib,
        "flags": args.flags, "steps": args.steps,
        "median_step_s": statistics.median(r["perf/step_time"] for r in timed),
        "max_peak_memory_gib": max(r.get(key, 0.0) for r in per_rollout for key in PHASES
                                   if key.endswith("peak_memory_gib")),
        "device_peak_gib": peak.peak_mib / 1024 if peak else None,
        "per_rollout": [{key: value for key, value in r.items()
                         if key in PHASES or key.startswith("perf/")} for r in per_rollout],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-gib", type=float, default=H100_GIB)
    parser.add_argument("--kv-fraction", type=float, default=0.8)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--flags", default="", help="more train.py flags")
    parser.add_argument("--cpu-check", action="store_true",
                        help="the same code path on a CPU (tiny model, hf engine)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as temporary:
        results = run(args, Path(temporary))
    name = f"one_gpu_{args.model}_{'lora' if args.lora_rank else 'full'}"
    write_results(name, results)
    print(json.dumps({k: v for k, v in results.items() if k != "per_rollout"}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
