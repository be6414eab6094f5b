"""What DDP's gradient all-reduce costs a training step on the CPU, and what the pipeline's DDP
options save: two processes of one thread each (the pipeline's CPU default: 2 Ray Train workers
on 2 cores, gloo) step the same model side by side, in interleaved rounds of one run. Prints ms
per step and ratios; record results in BENCHMARKS.md.

    python benchmarks/ddp_overhead.py --preset attention56 --batch-size 64 --steps 30 --rounds 3

Each round times, in turn:
- alone: each process steps its own model, with no gradient all-reduce, while the other does
  the same, so both cores are as busy as under DDP (the step's loss check still agrees on a
  finite loss with one scalar all-reduce, as the pipeline's does);
- DDP with torch's defaults;
- DDP with the pipeline's options (`pipeline.worker.DDP_OPTIONS`).
Every variant runs the pipeline's step (`resattn.training.train_epoch`) on the same random
images, initial weights and optimizer, channels_last and bf16 autocast where the CPU computes
bf16 (`resattn.training.autocast_dtype`), the batch being each process's share. Rounds
interleave so that drift in the machine's speed lands on every variant alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.cluster import free_port
from pipeline.worker import DDP_OPTIONS
from resattn.data import Normalization
from resattn.training import autocast_dtype, build_optimizer, build_scheduler, precision_name, train_epoch, training_model

WORLD_SIZE = 2
VARIANTS = {"alone (no gradient all-reduce)": None, "DDP, torch's defaults": {},
            f"DDP, the pipeline's options {DDP_OPTIONS}": DDP_OPTIONS}


def step_ms(args, ddp_options: dict | None, rank: int, images: torch.Tensor, labels: torch.Tensor) -> float:
    """This process's mean milliseconds a step over `args.steps` steps after `args.warmup_steps`."""
    torch.manual_seed(0)
    model = training_model(args.preset, channels_last=True)
    if ddp_options is not None:
        model = DistributedDataParallel(model, **ddp_options)
    optimizer = build_optimizer(model, "sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.warmup_steps + args.steps
    scheduler = build_scheduler(optimizer, total_steps=2 * steps, schedule="onecycle", warmup_steps=steps)
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dtype = autocast_dtype(torch.device("cpu"), True)

    def run(count: int, epoch: int) -> float:
        dist.barrier()
        started = time.perf_counter()
        # world_size=1: each process steps over all the images it was given, its own shard.
        train_epoch(model, optimizer, scheduler, images[: count * args.batch_size], labels[: count * args.batch_size],
                    norm, batch_size=args.batch_size, seed=rank, epoch=epoch, label_smoothing=0.1,
                    channels_last=True, autocast_dtype=dtype)
        return time.perf_counter() - started

    run(args.warmup_steps, 0)
    return run(args.steps, 1) * 1000 / args.steps


def process(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        generator = torch.Generator().manual_seed(rank)
        count = (args.warmup_steps + args.steps) * args.batch_size
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (count,), generator=generator)
        for round_index in range(args.rounds):
            for name, options in VARIANTS.items():
                milliseconds = step_ms(args, options, rank, images, labels)
                if rank == 0:
                    results.append((round_index, name, milliseconds))
                    print(f"round {round_index + 1}/{args.rounds}  {name:<70} {milliseconds:7.1f} ms a step",
                          flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="attention56")
    parser.add_argument("--batch-size", type=int, default=64, help="each process's share of the batch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant and round")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max((os.cpu_count() or 2) // WORLD_SIZE, 1),
                        help="per process, as the pipeline gives each worker its share of the cores")
    args = parser.parse_args()
    precision = precision_name(autocast_dtype(torch.device("cpu"), True))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}: "
          f"{args.preset}, {WORLD_SIZE} processes x {args.threads} thread(s), gloo, batch {args.batch_size} each, "
          f"{precision}, {args.steps} timed steps per variant, {args.rounds} rounds", flush=True)
    with mp.Manager() as manager:
        results = manager.list()
        mp.spawn(process, args=(args, free_port(), results), nprocs=WORLD_SIZE)
        results = list(results)
    medians = {name: statistics.median(ms for _, variant, ms in results if variant == name) for name in VARIANTS}
    alone = medians[next(iter(VARIANTS))]
    print("\nmedian over rounds (ms a step, and against the step alone):")
    for name, milliseconds in medians.items():
        print(f"  {name:<70} {milliseconds:7.1f}  {milliseconds / alone:5.3f}x  (+{milliseconds - alone:.1f} ms)")


if __name__ == "__main__":
    main()
