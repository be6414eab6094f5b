"""ASHA early stopping against running every trial to the end: the same search space, seed
and trial count, side by side in one run. Prints trial-epochs spent, the best validation
accuracy found and wall time for each, and the ratios; record results in BENCHMARKS.md.

    python benchmarks/asha_vs_full.py --samples 8 --max-epochs 4 --train-subset 5000

Runs on real CIFAR-10 prepared by `dvc repro preprocess` (data/prepared), with its own
temporary MLflow store and Ray storage, so the project's runs are untouched.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from pipeline.tune import sweep

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--preset", default="attention56_tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="asha-bench-"))
    assignments = [
        f"data.prepared_dir={ROOT / 'data' / 'prepared'}", f"model.preset={args.preset}",
        f"train.train_subset={args.train_subset}", "train.num_workers=1",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", f"ray.storage_path={work / 'ray_results'}",
        f"tune.num_samples={args.samples}", f"tune.max_epochs={args.max_epochs}", f"tune.seed={args.seed}",
        "tune.workers_per_trial=1", "tune.max_concurrent_trials=0",
    ]
    print(f"# {platform.machine()}, {args.samples} trials, {args.max_epochs} epochs max, "
          f"{args.train_subset} training images, {args.preset}, seed {args.seed}, workdir {work}")
    outcomes = {}
    for name, early in (("asha", True), ("full", False)):
        started = time.monotonic()
        summary = sweep(ROOT / "params.yaml", [*assignments, f"tune.name=bench-{name}", f"tune.early_stopping={str(early).lower()}"])
        outcomes[name] = (summary, time.monotonic() - started)
    for name, (summary, seconds) in outcomes.items():
        print(f"{name}: best val_accuracy {summary['val_accuracy']:.4f}, trial-epochs {summary['trial_epochs']}, "
              f"stopped early {summary['stopped_early']}/{summary['trials']}, wall {seconds / 60:.1f} min")
    asha, full = outcomes["asha"][0], outcomes["full"][0]
    print(f"ASHA/full: trial-epochs {asha['trial_epochs'] / full['trial_epochs']:.2f}x, "
          f"wall {outcomes['asha'][1] / outcomes['full'][1]:.2f}x, "
          f"best val_accuracy {asha['val_accuracy'] - full['val_accuracy']:+.4f}")


if __name__ == "__main__":
    main()
