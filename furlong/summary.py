"""`python -m furlong.summary RUN_DIR...`: eval scores before and after each run, as a table."""
from __future__ import annotations

import argparse
from pathlib import Path

from furlong.metrics import METRICS_FILE, read_metrics


def eval_scores(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """eval/NAME -> [(step, score), ...] of one run."""
    scores: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(Path(run_dir) / METRICS_FILE):
        for name, value in row.items():
            if name.startswith("eval/") and name.count("/") == 1:
                scores.setdefault(name, []).append((row["step"], value))
    return scores


def summary_table(run_dirs: list[str]) -> str:
    lines = [f"{'run':<28} {'metric':<20} {'before':>8} {'after':>8} {'change':>8}"]
    for run_dir in run_dirs:
        for name, points in sorted(eval_scores(run_dir).items()):
            before, after = points[0][1], points[-1][1]
            lines.append(f"{Path(run_dir).name:<28} {name:<20} {before:>8.3f} {after:>8.3f} "
                         f"{after - before:>+8.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", nargs="+")
    print(summary_table(parser.parse_args().run_dirs))


if __name__ == "__main__":
    main()
