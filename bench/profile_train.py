"""Where one furlong training step spends its GPU time, and the HF + Liger-Kernel anchor.

    python bench/profile_train.py [--model qwen3-1.7b] [--tokens 8192]

Profiles one TrainActor step (the `bench/train_mfu.py` work) by ATen operator (self CUDA
time), then times its phases separately: the packed forward without grad, forward and
backward, and the optimizer step. The anchor is plain HF with bf16 parameters and
Liger-Kernel's fused kernels (train_mfu.bench_hf_liger; the liger_kernel wheel carried). Writes $OUT/profile_train.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (device_name, qwen3_model, save_model_dir,  # noqa: E402
                          synthetic_tokenizer, write_results)
from bench.train_mfu import (PROMPT, SAMPLE, bench_hf_liger, furlong_actor,  # noqa: E402
                             synthetic_batch, timed)
from furlong.train.batch import pack  # noqa: E402
from furlong.train.flops import forward_flops, peak_flops  # noqa: E402


def op_table(fn) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        fn()
        torch.cuda.synchronize()
    return profile.key_averages().table(sort_by="self_cuda_time_total", row_limit=45,
                                        max_name_column_width=60)


def phases(actor, batch) -> dict:
    """Seconds of the packed forward (no grad), forward + backward, and optimizer step."""
    micro = pack(batch, list(range(len(batch))), actor.rank.device)
    policy = actor.policy

    def forward():
        with torch.no_grad():
            policy(micro)

    def forward_backward():
        log_probs, entropy = policy(micro)
        (log_probs.sum() + entropy.sum()).backward()

    result = {"forward_no_grad": timed(forward), "forward_backward": timed(forward_backward)}
    result["optimizer_step"] = timed(actor.optimizer.step)
    actor.optimizer.zero_grad(set_to_none=True)
    return result


def profile_furlong(model_dir: Path, tokens: int) -> tuple[dict, str]:
    actor = furlong_actor(model_dir, tokens)
    batch = synthetic_batch(tokens // SAMPLE)
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: actor.train(batch))
    result = {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "phases": phases(actor, batch)}
    return result, op_table(lambda: actor.train(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen3-1.7b")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    name = device_name()
    samples = args.tokens // SAMPLE
    results: dict = {"device": name, "torch": torch.__version__, "model": args.model,
                     "tokens": args.tokens}
    with tempfile.TemporaryDirectory() as temporary:
        model = qwen3_model(args.model, torch.bfloat16, "cpu")  # saved in bf16: half the bytes
        flops = 3 * forward_flops(model.config, [SAMPLE] * samples, [SAMPLE - PROMPT] * samples)
        model_dir = save_model_dir(model, Path(temporary) / "model", synthetic_tokenizer())
        del model
        results["furlong"], results["furlong_ops"] = profile_furlong(model_dir, args.tokens)
        results["furlong"]["mfu"] = flops / results["furlong"]["seconds"] / peak_flops(name)
        write_results("profile_train", results)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        seconds = bench_hf_liger(model_dir, args.tokens)
        results["hf_liger"] = {"seconds": seconds, "mfu": flops / seconds / peak_flops(name),
                               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        write_results("profile_train", results)
    print({k: v for k, v in results.items() if k != "furlong_ops"})
    print(results["furlong_ops"])


if __name__ == "__main__":
    main()
