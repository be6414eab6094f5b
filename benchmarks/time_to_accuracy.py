"""Validation accuracy against minutes of training, one curve per run: the time-to-accuracy plot
of BENCHMARKS.md. Each run is the `reports/train_history.csv` its train stage wrote (`dvc exp
show` and `dvc plots diff` compare the same files between experiments).

    python benchmarks/time_to_accuracy.py quick-cpu=../a/reports/train_history.csv \\
        hour-cpu=../b/reports/train_history.csv --out benchmarks/time_to_accuracy.png

Each curve has a point per validated epoch (every one, unless `train.validate_every` is above 1).
The x axis is the history's `training_minutes` (training and validation so far); histories
written before that column existed give their summed `epoch_seconds` instead (training alone,
without the few seconds of validation per epoch), and the legend says so.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from pipeline.common import save_figure


class Curve(NamedTuple):
    epochs: int
    minutes: list[float]  # at each validated epoch
    accuracy: list[float]  # validation accuracy (%) there
    with_validation: bool  # whether the minutes include validation


def curve(history: Path) -> Curve:
    with open(history) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {history} has no epochs")
    with_validation = "training_minutes" in rows[0]
    minutes = ([float(row["training_minutes"]) for row in rows] if with_validation
               else list(itertools.accumulate(float(row["epoch_seconds"]) / 60 for row in rows)))
    # With train.validate_every above 1, the epochs between validations have NaN (empty, in
    # histories of 353030c).
    accuracy = [100 * float(row["val_accuracy"] or "nan") for row in rows]
    validated = [(m, a) for m, a in zip(minutes, accuracy) if not math.isnan(a)]
    return Curve(len(rows), [m for m, _ in validated], [a for _, a in validated], with_validation)


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
        run_curve = curve(Path(path))
        minutes, accuracy = run_curve.minutes, run_curve.accuracy
        ax.plot(minutes, accuracy, marker=".",
                label=label + ("" if run_curve.with_validation else " (training time only)"))
        print(f"| {label} | {run_curve.epochs} | {minutes[-1]:.1f} | {accuracy[-1]:.2f}% | {max(accuracy):.2f}% |")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
