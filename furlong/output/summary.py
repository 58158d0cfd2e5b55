"""`python -m furlong.output.summary RUN_DIR...`: eval scores before and after each run,
as a table.

`python -m furlong.output.summary --last eval/NAME RUN_DIR` prints the run's latest score
alone (the demo script reads it to decide whether the SFT warm-up goes on).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from furlong.output.metrics import METRICS_FILE, read_metrics


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


def latest_score(run_dir: str | Path, name: str) -> float:
    points = eval_scores(run_dir).get(name)
    if not points:
        raise SystemExit(f"{run_dir}: no {name} in {METRICS_FILE}")
    return points[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--last", metavar="eval/NAME",
                        help="print only the latest score of this metric (one run)")
    args = parser.parse_args()
    if args.last:
        if len(args.run_dirs) != 1:
            parser.error("--last reads one run directory")
        print(latest_score(args.run_dirs[0], args.last))
    else:
        print(summary_table(args.run_dirs))


if __name__ == "__main__":
    main()
