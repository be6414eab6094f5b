"""What Ray Train costs: the same training epochs in a plain in-process loop and through a
one-worker TorchTrainer, in interleaved rounds of one run. Prints images/s, the CPU the training
process got, the median ratio over rounds, and Ray's fixed start-up; record results in
BENCHMARKS.md.

    python benchmarks/ray_overhead.py --preset attention56_narrow --images 4096 --epochs 4 --rounds 3

Each round runs the plain loop with no Ray running, then a one-worker fit on a fresh local Ray
for each Ray set-up: Ray's defaults (dashboard, every Train V2 helper) and the pipeline's own
`start_ray` (params.yaml's `ray` section: no dashboard, no preemption watcher, no Train
metrics). Rounds interleave so that drift in the machine's speed (other tenants, clocks)
lands on every path alike. Every path runs `timed_epochs` below: the same data, initial
weights, optimizer, thread count and fast paths (channels_last, and bf16 autocast where the CPU
computes bf16: resattn.training.autocast_dtype); the Ray worker
also reports metrics with a checkpoint of the full training state each epoch, as the
pipeline's does. `--ddp` adds the pipeline's CPU default, two workers of one thread each.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from pipeline.config import load_params
from pipeline.checkpoints import report_state
from pipeline.cluster import LOCAL_RAY_ENV, start_ray
from pipeline.worker import DDP_OPTIONS
from resattn import cifar10
from resattn.data import Normalization, channel_stats, to_tensor_nchw
from resattn.training import (autocast_dtype, build_optimizer, build_scheduler, precision_name, train_epoch,
                              training_model, training_state)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "cifar-10-batches-py"


def timed_epochs(config: dict, data: tuple, in_ray: bool) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds of this process) per epoch; in a Ray worker each epoch ends as
    the pipeline's do, reporting metrics with a checkpoint."""
    torch.set_num_threads(config["threads"])
    images, labels, norm = data
    rank, world_size = (ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()) if in_ray else (0, 1)
    torch.manual_seed(0)
    model = training_model(config["preset"], channels_last=True)
    if in_ray:
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)  # as the pipeline does
    optimizer = build_optimizer(model, "sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(labels) // config["batch_size"]
    scheduler = build_scheduler(optimizer, total_steps=steps * config["epochs"], schedule="onecycle", warmup_steps=steps // 2)
    epochs = []
    for epoch in range(config["epochs"]):
        started, cpu_started = time.perf_counter(), time.process_time()
        train_epoch(model, optimizer, scheduler, images, labels, norm, batch_size=config["batch_size"] // world_size,
                    seed=0, epoch=epoch, rank=rank, world_size=world_size, channels_last=True,
                    autocast_dtype=config["autocast_dtype"])
        if in_ray:
            report_state({"epoch": epoch + 1},
                         training_state(model, optimizer, scheduler, epoch, []) if rank == 0 else None)
        epochs.append((time.perf_counter() - started, time.process_time() - cpu_started))
    return epochs


def ray_worker(config: dict) -> None:
    epochs = timed_epochs(config, ray.get(config["data"]), in_ray=True)
    # Train V2's result carries the metrics of the last report *with* a checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if ray.train.get_context().get_world_rank() == 0 else None
        ray.train.report({"epochs": epochs}, checkpoint=checkpoint)


@contextmanager
def local_ray(setup: str, cpus: int):
    """A fresh local Ray with Ray's defaults or the pipeline's set-up; shut down on exit."""
    # start_ray also points Ray's state API at the Ray it starts: forget that between rounds.
    keys = [*LOCAL_RAY_ENV, "RAY_API_SERVER_ADDRESS"]
    saved = {key: os.environ.pop(key) for key in keys if key in os.environ}
    started = time.perf_counter()
    if setup == "defaults":
        ray.init(num_cpus=cpus, dashboard_host="127.0.0.1", runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    else:
        start_ray(load_params(ROOT / "params.yaml"))
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()
        for key in keys:
            os.environ.pop(key, None)
        os.environ.update(saved)


def through_ray(config: dict, data: tuple, workers: int, threads: int) -> tuple[list[tuple[float, float]], float]:
    """(per-epoch wall and CPU seconds inside rank 0, wall seconds of the whole fit)."""
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as storage:
        trainer = ray.train.torch.TorchTrainer(
            ray_worker,
            train_loop_config=config | {"data": ray.put(data), "threads": threads},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(name=f"overhead-{workers}x{threads}", storage_path=storage),
        )
        started = time.perf_counter()
        result = trainer.fit()
        return result.metrics["epochs"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 python-version folder")
    parser.add_argument("--preset", default="attention56_narrow")
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up and not compared")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ddp", action="store_true", help="also two one-thread workers (the pipeline's CPU default)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up")
    cpus = os.cpu_count() or 1

    train, _ = cifar10.load(args.data)
    mean, std = channel_stats(train.images)
    data = (to_tensor_nchw(train.images[: args.images]), torch.from_numpy(train.labels[: args.images].copy()),
            Normalization(tuple(mean), tuple(std)))
    precision = autocast_dtype(torch.device("cpu"), True)  # fp32 (None) on a CPU that would emulate bf16
    config = {"preset": args.preset, "epochs": args.epochs, "batch_size": args.batch_size, "autocast_dtype": precision}
    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}; "
          f"{args.preset}, {args.images} images x {args.epochs} epochs, batch {args.batch_size}, "
          f"{precision_name(precision)}, channels_last; "
          f"{args.rounds} rounds", flush=True)

    paths = {"plain loop, 1 process": [], "Ray defaults, 1 worker": [], "pipeline's Ray, 1 worker": []}
    if args.ddp:
        paths[f"pipeline's Ray, 2 workers x {cpus // 2} thread(s), DDP"] = []
    fixed = []

    def show(name: str, epochs: list[tuple[float, float]], threads: int = cpus) -> None:
        # The first epoch carries one-off warm-up (allocator, oneDNN kernel selection).
        steady = epochs[1:]
        rates = ", ".join(f"{args.images / wall:.0f}" for wall, _ in epochs)
        cpu_share = sum(cpu for _, cpu in steady) / sum(wall for wall, _ in steady)
        print(f"  {name:48s} img/s per epoch {rates:24s} CPU {100 * cpu_share:.0f}% of {100 * threads}%", flush=True)

    for round_index in range(args.rounds):
        print(f"round {round_index + 1}:", flush=True)
        names = iter(paths)
        name = next(names)
        paths[name].append(timed_epochs(config | {"threads": cpus}, data, in_ray=False))
        show(name, paths[name][-1])
        for setup in ("defaults", "pipeline"):
            with local_ray(setup, cpus) as init_seconds:
                name = next(names)
                epochs, wall = through_ray(config, data, workers=1, threads=cpus)
                paths[name].append(epochs)
                show(name, epochs)
                if setup == "pipeline":
                    fixed.append((init_seconds, wall - sum(w for w, _ in epochs)))
                    if args.ddp:
                        name = next(names)
                        paths[name].append(through_ray(config, data, workers=2, threads=max(cpus // 2, 1))[0])
                        show(name, paths[name][-1], threads=max(cpus // 2, 1))

    def steady_seconds(epochs: list[tuple[float, float]]) -> float:
        return sum(wall for wall, _ in epochs[1:])

    plain = [steady_seconds(epochs) for epochs in paths["plain loop, 1 process"]]
    print("steady epoch time against the plain loop of the same round (median over rounds):")
    for name, runs in list(paths.items())[1:]:
        ratios = [steady_seconds(epochs) / base for epochs, base in zip(runs, plain)]
        print(f"  {name:48s} {statistics.median(ratios):.3f}x  (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"fixed costs of the pipeline's Ray: start {statistics.median(i for i, _ in fixed):.1f} s; a one-worker fit "
          f"outside its epochs {statistics.median(o for _, o in fixed):.1f} s (controller and worker start, data, model)")


if __name__ == "__main__":
    main()
