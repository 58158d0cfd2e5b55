"""Console progress: a bar over rollouts with ETA, and one summary line per rollout."""
from __future__ import annotations

import sys

from tqdm import tqdm

# (metric, label, format) shown in the per-rollout line when present.
SUMMARY = (("rollout/raw_reward", "reward", "{:.3f}"), ("rollout/response_len/mean", "len",
                                                          "{:.1f}"),
           ("train/loss", "loss", "{:.4f}"), ("train/grad_norm", "gnorm", "{:.3f}"),
           ("perf/rollout_time", "gen", "{:.2f}s"), ("perf/actor_train_time", "train", "{:.2f}s"),
           ("perf/step_time", "step", "{:.2f}s"))


class Progress:
    def __init__(self, start: int, total: int):
        self.bar = tqdm(total=total, initial=start, desc="rollouts", unit="rollout",
                        file=sys.stderr, dynamic_ncols=True, disable=total == start)

    def update(self, rollout_id: int, metrics: dict) -> None:
        parts = [f"{label} {fmt.format(metrics[name])}" for name, label, fmt in SUMMARY
                 if name in metrics]
        self.bar.write(f"rollout {rollout_id}: " + "  ".join(parts), file=sys.stderr)
        postfix = {label: fmt.format(metrics[name]) for name, label, fmt in SUMMARY[:3]
                   if name in metrics}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
