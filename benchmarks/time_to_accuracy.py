"""Validation accuracy against minutes of training, one curve per run: the time-to-accuracy plot
of BENCHMARKS.md. Each run is the `reports/train_history.csv` its train stage wrote (`dvc exp
show` and `dvc plots diff` compare the same files between experiments).

    python benchmarks/time_to_accuracy.py quick-cpu=../a/reports/train_history.csv \\
        hour-cpu=../b/reports/train_history.csv --out benchmarks/time_to_accuracy.png

The x axis is the history's `training_minutes` (training and validation, every epoch); histories
written before that column existed give their summed `epoch_seconds` instead (training alone,
without the few seconds of validation per epoch), and the legend says so.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipeline.common import save_figure


def curve(history: Path) -> tuple[list[float], list[float], bool]:
    """(minutes, validation accuracy) after each epoch, and whether the minutes include validation."""
    with open(history) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {history} has no epochs")
    accuracy = [100 * float(row["val_accuracy"]) for row in rows]
    if "training_minutes" in rows[0]:
        return [float(row["training_minutes"]) for row in rows], accuracy, True
    return list(itertools.accumulate(float(row["epoch_seconds"]) / 60 for row in rows)), accuracy, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=CSV", help="a label and a train_history.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/time_to_accuracy.png")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print("| run | epochs | minutes | final val accuracy | best |")
    print("|---|---:|---:|---:|---:|")
    for run in args.runs:
        label, _, path = run.partition("=")
        if not path:
            raise SystemExit(f"error: {run!r} is not LABEL=CSV")
        minutes, accuracy, with_validation = curve(Path(path))
        ax.plot(minutes, accuracy, marker=".", label=label + ("" if with_validation else " (training time only)"))
        print(f"| {label} | {len(accuracy)} | {minutes[-1]:.1f} | {accuracy[-1]:.2f}% | {max(accuracy):.2f}% |")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
