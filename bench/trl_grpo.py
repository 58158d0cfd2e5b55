"""The TRL baseline of bench/e2e.py: GRPOTrainer on the same model, prompts and reward.

    python bench/trl_grpo.py MODEL_DIR PROMPTS_JSONL STEPS RESULT_JSON

32 prompts x 8 generations per optimizer step (per-device batch 32 x 8 accumulation
steps = 256 completions, generated together), max 256 new tokens, beta 0 (no reference
model), one iteration per generation, bf16 autocast over float32 weights. Records the
wall time between consecutive optimizer steps.
"""
from __future__ import annotations

import json
import random
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._last = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def random_reward(completions, **kwargs) -> list[float]:
    return [float(random.random() < 0.5) for _ in completions]


def main() -> None:
    model_dir, prompts_path, steps, result_path = sys.argv[1:5]
    rows = [json.loads(line) for line in open(prompts_path)]
    dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in rows])
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=32,
            gradient_accumulation_steps=8, num_generations=8, max_completion_length=256,
            temperature=1.0, top_p=1.0, learning_rate=1e-6, beta=0.0, num_iterations=1,
            bf16=True, max_steps=int(steps), logging_steps=1, report_to="none",
            save_strategy="no", seed=0, model_init_kwargs={"dtype": torch.float32})
        trainer = GRPOTrainer(model=model_dir, reward_funcs=random_reward, args=config,
                              train_dataset=dataset, callbacks=[timer])
        trainer.train()
    with open(result_path, "w") as handle:
        json.dump({"step_times": timer.times}, handle)
    print("TRL step times:", timer.times)


if __name__ == "__main__":
    main()
