"""GRPO on two GPUs under Ray: colocated, disaggregated, and train_async.py.

    python bench/scale.py [--model qwen3-1.7b] [--steps 5] [--layouts colocated ...]
    python bench/scale.py --cpu-check   # the same runs on a tiny model, CPU processes

Work per rollout: 32 prompts x 8 samples, 128-token prompts, up to 256 new tokens at
temperature 1, random 0/1 reward, one optimizer step; random-init weights (bf16 on the
engines, float32 master weights in the trainer).

- colocated: `--actor-num-gpus-per-node 2 --colocate`, two trainer ranks (FSDP2) and an
  engine on each of their GPUs; weights move by CUDA IPC.
- disaggregated: `--actor-num-gpus-per-node 1 --rollout-num-gpus 1`; weights move by
  an NCCL broadcast in `--update-weight-buffer-size` buckets.
- async: train_async.py on the disaggregated layout; generation of rollout k+1
  overlaps training of rollout k.

Per layout, medians over the rollouts after the first: step time, rollout time, train
time (log-probs and optimizer step), `perf/update_weights_time`, training tokens/s per
GPU. For async: the overlap ratio, step time over max(rollout, train) of the same run
(1.0 is perfect overlap), and the speed-up over the synchronous disaggregated run.
Writes $OUT/scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402
from bench.e2e import run_train, write_workload  # noqa: E402

DISAGGREGATED = ("--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1")
LAYOUTS = {
    "colocated": ("train.py", ("--actor-num-gpus-per-node", "2", "--colocate")),
    "disaggregated": ("train.py", DISAGGREGATED),
    "async": ("train_async.py", DISAGGREGATED),
}
FULL_WORK = dict(num_prompts=32, num_samples=8, prompt_len=128, new_tokens=256)
CPU_WORK = dict(num_prompts=4, num_samples=2, prompt_len=8, new_tokens=8)


def summarize(rows: list[dict]) -> dict:
    """Medians over the rollouts after the first (the first compiles and warms up)."""
    steady = rows[1:] or rows

    def median(value) -> float:
        return statistics.median(value(r) for r in steady)

    return {"rollouts": len(rows),
            "step_s": median(lambda r: r["perf/step_time"]),
            "rollout_s": median(lambda r: r["perf/rollout_time"]),
            "train_s": median(lambda r: r["perf/train_end"] - r["perf/train_start"]),
            "update_weights_s": median(lambda r: r.get("perf/update_weights_time", 0.0)),
            "train_tokens_per_gpu_s": median(lambda r: r["perf/tokens_per_gpu_per_sec"]),
            "response_len": median(lambda r: r["rollout/response_len/mean"]),
            "logprob_abs_diff": median(lambda r: r["train/train_rollout_logprob_abs_diff"])}


def compare(results: dict) -> dict:
    """The async figures the issue asks for, from the summaries of one call."""
    async_run = results.get("async")
    if async_run is None:
        return {}
    figures = {"async_overlap_ratio": async_run["step_s"]
               / max(async_run["rollout_s"], async_run["train_s"])}
    if "disaggregated" in results:
        figures["async_speedup_over_sync"] = results["disaggregated"]["step_s"] \
            / async_run["step_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-1.7b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--cpu-check", action="store_true",
                        help="tiny model, tiny work, CPU processes: checks this script")
    args = parser.parse_args()
    model, work = ("qwen3-tiny", CPU_WORK) if args.cpu_check else (args.model, FULL_WORK)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results: dict = {"device": device, "gpus": torch.cuda.device_count(), "model": model,
                     "work": work, "steps": args.steps}
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        model_dir, prompts = write_workload(directory, args.steps, model,
                                            work["num_prompts"], work["prompt_len"])
        for layout in args.layouts:
            script, flags = LAYOUTS[layout]
            rows = run_train(model_dir, prompts, args.steps, directory / layout, script,
                             flags, work["num_prompts"], work["num_samples"],
                             work["new_tokens"])
            results[layout] = summarize(rows)
            write_results("scale", results)  # what finished survives a later failure
    results.update(compare(results))
    write_results("scale", results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
