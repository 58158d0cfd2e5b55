"""One GRPO step end to end on one GPU: train.py (fast engine) vs TRL's GRPOTrainer.

    python bench/e2e.py [--steps 6] [--skip-trl]

Identical work: Qwen3-0.6B architecture (random init), 32 prompts x 8 samples,
128-token prompts, up to 256 new tokens at temperature 1, a random 0/1 reward, no
reference model, one optimizer step per rollout (AdamW, lr 1e-6, bf16 autocast over
float32 weights on both sides). TRL runs its default HF-generate path. Step time is
the median over steps after the first. Writes $OUT/e2e.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (device_name, qwen3_model, save_model_dir,  # noqa: E402
                          synthetic_tokenizer, write_prompts, write_results)


def write_workload(directory: Path, steps: int, model: str = "qwen3-0.6b",
                   num_prompts: int = 32, prompt_len: int = 128) -> tuple[Path, Path]:
    """A random-init `model` (float32 on disk) and `num_prompts` x `steps` prompts of
    `prompt_len` words, each a token of the synthetic tokenizer."""
    model_dir = save_model_dir(qwen3_model(model, torch.float32, "cpu"),
                               directory / "model", synthetic_tokenizer())
    return model_dir, write_prompts(directory / "prompts.jsonl", num_prompts * steps,
                                    prompt_len)


def run_train(model_dir: Path, prompts: Path, steps: int, run_dir: Path,
              script: str = "train.py", extra: tuple[str, ...] = (), num_prompts: int = 32,
              num_samples: int = 8, new_tokens: int = 256) -> list[dict]:
    """Run `script` on the workload; its per-rollout metric rows."""
    argv = [sys.executable, str(ROOT / script), "--hf-checkpoint", str(model_dir),
            "--prompt-data", str(prompts), "--input-key", "prompt", "--rm-type", "random",
            "--rollout-batch-size", str(num_prompts), "--n-samples-per-prompt",
            str(num_samples), "--rollout-max-response-len", str(new_tokens),
            "--rollout-temperature", "1.0", "--global-batch-size",
            str(num_prompts * num_samples), "--use-dynamic-batch-size",
            "--max-tokens-per-gpu", "16384", "--lr", "1e-6", "--num-rollout", str(steps),
            "--run-dir", str(run_dir), *extra]
    subprocess.run(argv, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/step_time" in r]


def run_furlong(model_dir: Path, prompts: Path, steps: int, run_dir: Path) -> dict:
    per_rollout = run_train(model_dir, prompts, steps, run_dir)
    keys = ("perf/step_time", "perf/rollout_time", "perf/actor_train_time",
            "perf/update_weights_time", "rollout/response_len/mean",
            "train/train_rollout_logprob_abs_diff", "perf/actor_train_tflops")
    return {"step_times": [r["perf/step_time"] for r in per_rollout],
            "median_step_s": statistics.median(r["perf/step_time"] for r in per_rollout[1:]),
            "last": {k: per_rollout[-1].get(k) for k in keys}}


def run_trl(model_dir: Path, prompts: Path, steps: int, out_dir: Path) -> dict:
    result_file = out_dir / "trl.json"
    subprocess.run([sys.executable, str(ROOT / "bench/trl_grpo.py"), str(model_dir),
                    str(prompts), str(steps), str(result_file)], check=True, cwd=ROOT)
    times = json.loads(result_file.read_text())["step_times"]
    return {"step_times": times, "median_step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        model_dir, prompts = write_workload(directory, args.steps)
        results = {"device": device_name(), "torch": torch.__version__, "steps": args.steps,
                   "furlong": run_furlong(model_dir, prompts, args.steps, directory / "run")}
        write_results("e2e", results)
        if not args.skip_trl:
            results["trl"] = run_trl(model_dir, prompts, args.steps, directory)
            results["speedup"] = (results["trl"]["median_step_s"]
                                  / results["furlong"]["median_step_s"])
        write_results("e2e", results)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
