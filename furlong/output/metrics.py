"""Metric sinks: metrics.jsonl in the run directory, TensorBoard, Weights & Biases (with
Miles' --wandb-key/-host/-team/-run-id/-dir).

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
            self._wandb = _wandb_run(config, self.run_dir, flat_config)

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


def _wandb_run(config: LoggingArgs, run_dir: Path, flat_config: dict | None):
    """A W&B run as Miles starts one: --wandb-key / --wandb-host log in to that server
    (for this run only: nothing is written to ~/.netrc), --wandb-team is the entity,
    --wandb-run-id resumes that run, --wandb-dir holds the files (default: the run
    directory)."""
    import wandb
    settings = wandb.Settings(**{name: value for name, value in (
        ("api_key", config.wandb_key), ("base_url", config.wandb_host)) if value})
    return wandb.init(project=config.wandb_project, entity=config.wandb_team,
                      group=config.wandb_group, mode=config.wandb_mode,
                      dir=config.wandb_dir or str(run_dir), id=config.wandb_run_id,
                      resume="allow" if config.wandb_run_id else None, config=flat_config,
                      settings=settings)


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
