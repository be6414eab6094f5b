"""A soak: one long sweep of tiny trials on a local Ray, then what it left behind. Prints trials
per hour, the driver's peak RSS and its growth after warm-up, whether every trial is an MLflow
child run of the sweep, and whether Ray got all its CPUs back (no placement group or actor of
a trial left alive); record results in BENCHMARKS.md.

    python benchmarks/soak.py --samples 64

The trials train attention56_tiny on a subset of real CIFAR-10 prepared by `dvc repro
preprocess` (data/prepared) and run in a temporary folder with their own MLflow store and Ray
storage, so the project's runs are untouched. This process is the sweep's driver.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors, list_placement_groups

from pipeline.ray_hooks import quiet_libraries
from pipeline.tune import sweep

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2


class RssSampler:
    """This process's resident memory, once a second, in the background."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process, started = psutil.Process(), time.monotonic()
        while not self._stop.wait(1.0):
            self.samples.append((time.monotonic() - started, process.memory_info().rss))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, share: float) -> int:
        """RSS at `share` of the run's duration."""
        return self.samples[min(len(self.samples) - 1, int(share * len(self.samples)))][1]


def leftovers(timeout: float = 120) -> tuple[dict, list, list]:
    """Once Ray has had `timeout` seconds to free the trials' resources: (CPUs free and total,
    placement groups not removed, actors alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
        if free == total:
            break
        time.sleep(2)
    groups = [group.placement_group_id for group in list_placement_groups(limit=10_000) if group.state != "REMOVED"]
    actors = [actor.class_name for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)]
    return {"free": free, "total": total}, groups, actors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=1000)
    args = parser.parse_args()
    quiet_libraries()  # as pipeline/tune.py does

    prepared = ROOT / "data" / "prepared"
    if not (prepared / "train.npz").is_file():
        raise SystemExit(f"{prepared} has no prepared data: run `dvc repro preprocess` first")
    work = Path(tempfile.mkdtemp(prefix="soak-bench-"))
    os.chdir(work)  # the sweep's reports/ go here
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    assignments = [
        f"data.prepared_dir={prepared}", "model.preset=attention56_tiny", f"train.train_subset={args.train_subset}",
        "train.num_workers=1", f"mlflow.tracking_uri={tracking_uri}", f"ray.storage_path={work / 'ray_results'}",
        "tune.name=soak", f"tune.num_samples={args.samples}", f"tune.max_epochs={args.max_epochs}",
        "tune.workers_per_trial=1", "tune.max_concurrent_trials=0",
    ]
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, {args.samples} trials of attention56_tiny, "
          f"{args.max_epochs} epochs max, {args.train_subset} training images; workdir {work}", flush=True)
    started = time.monotonic()
    with RssSampler() as rss:
        summary = sweep(ROOT / "params.yaml", assignments)
    hours = (time.monotonic() - started) / 3600
    cpus, groups, actors = leftovers()

    client = MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("resattn-cifar10").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.role = 'sweep' and tags.sweep = 'soak'")
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=10_000)
    # The last moments are the best trial's evaluation and registration, not trials.
    warm, end = rss.at(0.25), rss.at(0.95)
    peak = max(sample for _, sample in rss.samples)
    print(f"trials: {summary['trials']} in {hours * 60:.1f} min = {summary['trials'] / hours:.0f} trials/hour "
          f"({summary['stopped_early']} stopped early by ASHA, {summary['trial_epochs']} trial-epochs)")
    print(f"MLflow: {len(children)} child runs under the sweep's parent run (expected {args.samples})")
    print(f"driver RSS: peak {peak / MIB:.0f} MiB; at 25% of the run {warm / MIB:.0f} MiB, at 95% "
          f"{end / MIB:.0f} MiB: {(end - warm) / MIB:+.0f} MiB after warm-up ({(end - warm) / warm:+.1%})")
    print(f"Ray afterwards: {cpus['free']:g} of {cpus['total']:g} CPUs free; {len(groups)} placement group(s) "
          f"not removed; actors alive: {sorted(actors) or 'none'}")


if __name__ == "__main__":
    main()
