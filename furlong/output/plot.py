"""The reward curve: rollout reward and eval scores against rollout, drawn to a PNG."""
from __future__ import annotations

from pathlib import Path

from furlong.output.metrics import read_metrics


def plot_rewards(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot rollout/raw_reward and every eval/NAME series of a metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for name, value in row.items():
            if name == "rollout/raw_reward" or (name.startswith("eval/") and name.count("/") == 1):
                steps, values = series.setdefault(name, ([], []))
                steps.append(row["step"])
                values.append(value)
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, (steps, values) in sorted(series.items()):
        style = "-" if name.startswith("rollout") else "o--"
        axis.plot(steps, values, style, label=name)
    axis.set_xlabel("rollout")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    if series:
        axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return Path(out_path)
