"""Where one furlong training step spends its GPU time, and the HF + Liger-Kernel anchor.

    python bench/profile_train.py [--model qwen3-1.7b] [--tokens 8192]

Profiles one TrainActor step (the `bench/train_mfu.py` work) by ATen operator (self CUDA
time), then times its phases separately: the packed forward without grad, forward and
backward, and the optimizer step. The anchor is plain HF with bf16 parameters and
Liger-Kernel's fused kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy), when the
liger_kernel wheel is installed. Writes $OUT/profile_train.json.
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
from bench.train_mfu import SAMPLE, PROMPT, furlong_actor, synthetic_batch, timed  # noqa: E402
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


def bench_liger(model_dir: Path, tokens: int) -> dict:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    except ImportError as error:
        return {"error": f"liger_kernel not installed ({error})"}
    from transformers import AutoModelForCausalLM
    apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True,
                                fused_linear_cross_entropy=True, cross_entropy=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
    ids = torch.randint(1, 150000, (tokens // SAMPLE, SAMPLE), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step)
    return {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


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
        model = qwen3_model(args.model, torch.float32, "cpu")
        flops = 3 * forward_flops(model.config, [SAMPLE] * samples, [SAMPLE - PROMPT] * samples)
        model_dir = save_model_dir(model, Path(temporary) / "model", synthetic_tokenizer())
        del model
        actor = furlong_actor(model_dir, args.tokens)
        batch = synthetic_batch(samples)
        torch.cuda.reset_peak_memory_stats()
        step = timed(lambda: actor.train(batch))
        results["furlong"] = {"seconds": step, "mfu": flops / step / peak_flops(name),
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                              "phases": phases(actor, batch)}
        results["furlong_ops"] = op_table(lambda: actor.train(batch))
        write_results("profile_train", results)
        del actor
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        liger = bench_liger(model_dir, args.tokens)
        if "seconds" in liger:
            liger["mfu"] = flops / liger["seconds"] / peak_flops(name)
        results["hf_liger"] = liger
        write_results("profile_train", results)
    print({k: v for k, v in results.items() if k != "furlong_ops"})
    print(results["furlong_ops"])


if __name__ == "__main__":
    main()
