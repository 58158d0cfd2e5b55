"""Metric sinks: metrics.jsonl in the run directory, TensorBoard, Weights & Biases.

Every row is `{"step": rollout_id, "time": unix seconds, name: value, ...}`; the names
are Miles' (rollout/..., train/..., perf/..., eval/...), so dashboards carry over.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from furlong.config.groups import LoggingArgs

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: str | Path, config: LoggingArgs, flat_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a", buffering=1)
        self._tensorboard = None
        self._wandb = None
        if config.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard" /
                                                  (config.tb_project_name or "")))
        if config.use_wandb:
            import wandb
            self._wandb = wandb.init(project=config.wandb_project, group=config.wandb_group,
                                     mode=config.wandb_mode, dir=str(self.run_dir),
                                     config=flat_config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {name: float(value) for name, value in metrics.items()
                 if value is not None and math.isfinite(float(value))}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self._tensorboard is not None:
            for name, value in clean.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl. A resumed run appends rows for steps it redoes; where the
    step goes backwards, the earlier rows of those steps are dropped."""
    rows: list[dict] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if rows and row["step"] < rows[-1]["step"]:
            rows = [kept for kept in rows if kept["step"] < row["step"]]
        rows.append(row)
    return rows
