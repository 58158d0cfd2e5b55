"""Console progress: one summary line per rollout with the ETA, and a bar on terminals."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

# (metric, label, format) shown in the per-rollout line when present.
SUMMARY = (("rollout/raw_reward", "reward", "{:.3f}"),
           ("rollout/response_len/mean", "len", "{:.1f}"),
           ("train/loss", "loss", "{:.4f}"), ("train/grad_norm", "gnorm", "{:.3f}"),
           ("perf/rollout_time", "gen", "{:.2f}s"), ("perf/actor_train_time", "train", "{:.2f}s"),
           ("perf/step_time", "step", "{:.2f}s"))


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    def __init__(self, start: int, total: int):
        self.start, self.total = start, total
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=start, desc="rollouts", unit="rollout",
                        file=sys.stderr, dynamic_ncols=True, leave=False,
                        disable=total == start or not sys.stderr.isatty())

    def update(self, rollout_id: int, metrics: dict) -> None:
        done = rollout_id + 1 - self.start
        eta = (time.monotonic() - self.started) / done * (self.total - rollout_id - 1)
        parts = [f"{label} {fmt.format(metrics[name])}" for name, label, fmt in SUMMARY
                 if name in metrics]
        line = (f"rollout {rollout_id + 1}/{self.total}: " + "  ".join(parts)
                + f"  eta {format_duration(eta)}")
        self.bar.write(line, file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
