"""What Ray Train costs: the same training epochs in a plain in-process loop and through a
one-worker TorchTrainer, side by side in one run. Prints images/s per epoch and the ratio, and
Ray's fixed start-up; record results in BENCHMARKS.md.

    python benchmarks/ray_overhead.py --preset attention56_narrow --images 8192 --epochs 3

Both paths run `timed_epochs` below: the same data, initial weights, optimizer, thread count
and fast paths (channels_last, bf16 autocast). The Ray worker also does what the pipeline's
worker does each epoch and the plain loop does not need: report metrics with a checkpoint of
the full training state. A third row runs the pipeline's CPU default, two workers of one thread
each with DDP, to show what data parallelism buys on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from resattn import cifar10, create_model
from resattn.data import Normalization, channel_stats, to_tensor_nchw
from resattn.training import build_optimizer, build_scheduler, train_epoch, unwrap

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "cifar-10-batches-py"


def timed_epochs(config: dict, data: tuple, in_ray: bool) -> list[float]:
    """Seconds per epoch; in a Ray worker each epoch ends as the pipeline's do, reporting
    metrics with a checkpoint."""
    torch.set_num_threads(config["threads"])
    images, labels, norm = data
    rank, world_size = (ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()) if in_ray else (0, 1)
    torch.manual_seed(0)
    model = create_model(config["preset"]).to(memory_format=torch.channels_last)
    if in_ray:
        model = ray.train.torch.prepare_model(model)  # DDP with more than one worker, as in the pipeline
    optimizer = build_optimizer(model, "sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(labels) // config["batch_size"]
    scheduler = build_scheduler(optimizer, total_steps=steps * config["epochs"], schedule="onecycle", warmup_steps=steps // 2)
    seconds = []
    for epoch in range(config["epochs"]):
        started = time.perf_counter()
        train_epoch(model, optimizer, scheduler, images, labels, norm, batch_size=config["batch_size"] // world_size,
                    seed=0, epoch=epoch, rank=rank, world_size=world_size, channels_last=True,
                    autocast_dtype=torch.bfloat16)
        if in_ray:
            metrics = {"epoch": epoch + 1}
            if rank == 0:
                with tempfile.TemporaryDirectory() as directory:
                    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict()}, Path(directory) / "state.pt")
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics)
        seconds.append(time.perf_counter() - started)
    return seconds


def ray_worker(config: dict) -> None:
    seconds = timed_epochs(config, ray.get(config["data"]), in_ray=True)
    # Train V2's result carries the metrics of the last report *with* a checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if ray.train.get_context().get_world_rank() == 0 else None
        ray.train.report({"epoch_seconds": seconds}, checkpoint=checkpoint)


def through_ray(config: dict, data_ref, workers: int, threads: int, storage: str) -> tuple[list[float], float]:
    """(seconds per epoch inside the worker, wall seconds of the whole fit)."""
    trainer = ray.train.torch.TorchTrainer(
        ray_worker,
        train_loop_config=config | {"data": data_ref, "threads": threads},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=f"overhead-{workers}x{threads}-{time.time_ns()}", storage_path=storage),
    )
    started = time.perf_counter()
    result = trainer.fit()
    return result.metrics["epoch_seconds"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 python-version folder")
    parser.add_argument("--preset", default="attention56_narrow")
    parser.add_argument("--images", type=int, default=8192, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1

    train, _ = cifar10.load(args.data)
    mean, std = channel_stats(train.images)
    data = (to_tensor_nchw(train.images[: args.images]), torch.from_numpy(train.labels[: args.images].copy()),
            Normalization(tuple(mean), tuple(std)))
    config = {"preset": args.preset, "epochs": args.epochs, "batch_size": args.batch_size}
    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}; "
          f"{args.preset}, {args.images} images x {args.epochs} epochs, batch {args.batch_size}, bf16, channels_last")

    plain = timed_epochs(config | {"threads": cpus}, data, in_ray=False)
    started = time.perf_counter()
    # The dashboard (on loopback) serves the state API that Train V2 polls.
    ray.init(num_cpus=cpus, dashboard_host="127.0.0.1", runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    init_seconds = time.perf_counter() - started
    data_ref = ray.put(data)
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as storage:
        one, one_wall = through_ray(config, data_ref, workers=1, threads=cpus, storage=storage)
        two, two_wall = (through_ray(config, data_ref, workers=2, threads=cpus // 2, storage=storage)
                         if cpus >= 2 else (None, None))
    ray.shutdown()

    def rates(seconds: list[float]) -> str:
        return ", ".join(f"{args.images / s:.0f}" for s in seconds)

    # The first epoch carries one-off warm-up (allocator, oneDNN kernel selection): compare the rest.
    steady = slice(1, None) if args.epochs > 1 else slice(None)
    plain_steady = sum(plain[steady])
    print(f"plain loop, 1 process x {cpus} threads:      img/s per epoch {rates(plain)}")
    print(f"Ray Train, 1 worker x {cpus} threads:        img/s per epoch {rates(one)}   "
          f"steady epochs take {sum(one[steady]) / plain_steady:.3f}x the plain loop's "
          f"(overhead {100 * (sum(one[steady]) / plain_steady - 1):+.1f}%)")
    if two is not None:
        print(f"Ray Train, 2 workers x {cpus // 2} thread(s), DDP: img/s per epoch {rates(two)}   "
              f"steady epochs take {sum(two[steady]) / plain_steady:.3f}x the plain loop's")
    print(f"fixed costs: ray.init {init_seconds:.1f} s; one-worker fit outside its epochs "
          f"{one_wall - sum(one):.1f} s (worker start, data, model)")


if __name__ == "__main__":
    main()
