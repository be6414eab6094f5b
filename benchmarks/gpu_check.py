"""The GPU check: what one GPU does with Attention-92, in one command sized for the device
machine (torch only, no internet, at most 64 MiB of files per call, minutes of device time).

    python benchmarks/gpu_check.py pack --prepared data/prepared --out data/gpu_check.npz   # here
    python benchmarks/gpu_check.py run --data data/gpu_check.npz --out $OUT/gpu_check.json   # there

`pack` takes the first --train-images of the prepared training split and the first
--test-images of the test split into one uncompressed .npz (3,072 bytes an image: the default
15,000 + 5,000 are 61.5 MB, under the 64 MiB a call carries), with the training split's mean
and std. `run` reports, as JSON and one line each:

- training img/s of the real step (resattn.training.train_epoch: on-device shuffle and
  augmentation) in three modes: eager fp32; channels_last + bf16 autocast (fp16 with loss
  scaling where the GPU has no bf16); the same + torch.compile;
- host synchronisations per training step, counted with torch.cuda.set_sync_debug_mode over
  two epochs of different lengths (the difference is per step; the goal is 0);
- peak GPU memory of each mode;
- a short accuracy run: --accuracy-epochs of one-cycle SGD on the packed training images, then
  the packed test images, once (a subset of CIFAR-10: the report says how many of each).

On a CPU (`--device cpu`) it runs the same code, which is how it is tested; the sync count
and memory are GPU-only and reported as null there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # resattn, from a bare copy of the repo

from resattn import create_model  # noqa: E402
from resattn.cifar10 import Split  # noqa: E402
from resattn.data import Normalization, load_split, to_tensor_nchw  # noqa: E402
from resattn.training import (  # noqa: E402
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    evaluate,
    grad_scaler,
    train_epoch,
)

MODES = {  # name: (channels_last, mixed precision, compile)
    "eager fp32": (False, False, False),
    "channels_last + mixed precision": (True, True, False),
    "channels_last + mixed precision + compile": (True, True, True),
}


def pack(prepared: Path, out: Path, train_images: int, test_images: int) -> None:
    train, test = load_split(prepared / "train.npz"), load_split(prepared / "test.npz")
    stats = json.loads((prepared / "stats.json").read_text())
    if train_images > len(train) or test_images > len(test):
        raise SystemExit(f"error: {prepared} has {len(train)} training and {len(test)} test images; "
                         f"asked for {train_images} and {test_images}")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, train_images=train.images[:train_images], train_labels=train.labels[:train_images],
             test_images=test.images[:test_images], test_labels=test.labels[:test_images],
             mean=np.array(stats["mean"]), std=np.array(stats["std"]))
    print(f"wrote {out}: {train_images} training and {test_images} test images, {out.stat().st_size / 2**20:.1f} MiB")


class Trainer:
    """One model, optimizer and schedule in one mode, stepping through train_epoch."""

    def __init__(self, args, images: torch.Tensor, labels: torch.Tensor, norm: Normalization, *,
                 channels_last: bool, mixed: bool, compile: bool, epochs: int):
        torch.manual_seed(0)
        self.model = create_model(args.preset).to(args.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.runner = torch.compile(self.model) if compile else self.model
        steps = len(labels) // args.batch_size
        self.optimizer = build_optimizer(self.model, "sgd", args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                         decay_norm_and_bias=False)
        self.scheduler = build_scheduler(self.optimizer, total_steps=steps * epochs, schedule="onecycle",
                                         warmup_steps=max(steps * epochs // 5, 1))
        self.dtype = autocast_dtype(args.device, mixed)
        self.scaler = grad_scaler(args.device, self.dtype)
        self.images, self.labels, self.norm, self.args = images, labels, norm, args
        self.channels_last = channels_last

    def epoch(self, epoch: int, count: int | None = None):
        count = count or len(self.labels)
        return train_epoch(self.runner, self.optimizer, self.scheduler, self.images[:count], self.labels[:count],
                           self.norm, batch_size=self.args.batch_size, seed=0, epoch=epoch, label_smoothing=0.1,
                           device=self.args.device, channels_last=self.channels_last, autocast_dtype=self.dtype,
                           scaler=self.scaler)


def synchronizations(trainer: Trainer, steps: int, epoch: int) -> int:
    """Host synchronisations in one epoch of `steps` steps (CUDA's sync debug mode warns at each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.epoch(epoch, steps * trainer.args.batch_size)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


def measure_mode(args, name: str, images, labels, norm) -> dict:
    channels_last, mixed, compile = MODES[name]
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(args, images, labels, norm, channels_last=channels_last, mixed=mixed, compile=compile, epochs=1)
    started = time.perf_counter()
    trainer.epoch(0, args.warmup_steps * args.batch_size)  # cuDNN's algorithm search, compilation
    warmup_seconds = time.perf_counter() - started
    timed = args.steps * args.batch_size
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = trainer.epoch(1, timed)
    if cuda:
        torch.cuda.synchronize()
    report = {"mode": name, "img_per_s": result.images / (time.perf_counter() - started),
              "warmup_seconds": warmup_seconds, "precision": str(trainer.dtype or torch.float32).removeprefix("torch."),
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "host_syncs_per_step": None}
    if cuda:
        short, long = max(args.steps // 4, 2), args.steps
        syncs = {steps: synchronizations(trainer, steps, epoch) for epoch, steps in ((2, short), (3, long))}
        report["host_syncs_per_step"] = (syncs[long] - syncs[short]) / (long - short)
        report["host_syncs_per_epoch"] = syncs[long]
    return report


def accuracy_run(args, images, labels, test_images, test_labels, norm) -> dict:
    trainer = Trainer(args, images, labels, norm, channels_last=True, mixed=True, compile=False,
                      epochs=args.accuracy_epochs)
    started, curve = time.perf_counter(), []
    for epoch in range(args.accuracy_epochs):
        result = trainer.epoch(epoch)
        curve.append({"epoch": epoch + 1, "train_accuracy": result.accuracy, "minutes": (time.perf_counter() - started) / 60})
        print(f"  accuracy run epoch {epoch + 1}/{args.accuracy_epochs}: train acc {result.accuracy:.4f}, "
              f"{result.images_per_second:,.0f} img/s", flush=True)
    minutes = (time.perf_counter() - started) / 60
    test = evaluate(trainer.model, test_images, test_labels, norm, batch_size=500, flip_tta=True,
                    device=args.device, channels_last=True, autocast_dtype=trainer.dtype)
    return {"preset": args.preset, "epochs": args.accuracy_epochs, "train_images": len(labels),
            "test_images": len(test_labels), "training_minutes": minutes, "test_accuracy": test.accuracy,
            "test_accuracy_single_view": test.single_view_accuracy, "curve": curve}


def run(args) -> None:
    with np.load(args.data) as packed:
        train = Split(packed["train_images"], packed["train_labels"])
        test = Split(packed["test_images"], packed["test_labels"])
        norm = Normalization(tuple(packed["mean"].tolist()), tuple(packed["std"].tolist()))
    needed = (args.warmup_steps + args.steps) * args.batch_size
    if needed > len(train):
        raise SystemExit(f"error: --steps {args.steps} and --warmup-steps {args.warmup_steps} of batch "
                         f"{args.batch_size} need {needed} training images; {args.data} has {len(train)}")
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline's workers do
    images = to_tensor_nchw(train.images).to(args.device)
    labels = torch.from_numpy(train.labels).to(args.device)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "CPU"
    report = {"device": device_name, "torch": torch.__version__, "preset": args.preset, "batch_size": args.batch_size,
              "timed_steps": args.steps, "data": f"{len(train)} CIFAR-10 training and {len(test)} test images "
                                                  f"({args.data.name})", "modes": []}
    print(f"# {device_name}, torch {torch.__version__}, {args.preset}, batch {args.batch_size}, "
          f"{args.steps} timed steps per mode", flush=True)
    for name in args.modes:
        mode = measure_mode(args, name, images, labels, norm)
        report["modes"].append(mode)
        memory = f", peak {mode['peak_memory_gib']:.2f} GiB" if mode["peak_memory_gib"] is not None else ""
        syncs = (f", {mode['host_syncs_per_step']:.2f} host syncs per step ({mode['host_syncs_per_epoch']} in an "
                 f"epoch of {args.steps} steps)" if mode["host_syncs_per_step"] is not None else "")
        print(f"{name:<44} {mode['img_per_s']:9,.0f} img/s ({mode['precision']}, warm-up "
              f"{mode['warmup_seconds']:.0f} s{memory}){syncs}", flush=True)
    if args.accuracy_epochs:
        accuracy = accuracy_run(args, images, labels, to_tensor_nchw(test.images), torch.from_numpy(test.labels), norm)
        report["accuracy"] = accuracy
        print(f"accuracy run: {accuracy['test_accuracy']:.4f} test accuracy (flip TTA; single view "
              f"{accuracy['test_accuracy_single_view']:.4f}) on {accuracy['test_images']} test images after "
              f"{accuracy['epochs']} epochs on {accuracy['train_images']} training images, "
              f"{accuracy['training_minutes']:.1f} min", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write the data file that travels to the GPU machine")
    packing.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="the preprocess stage's output")
    packing.add_argument("--out", type=Path, default=Path("data/gpu_check.npz"))
    packing.add_argument("--train-images", type=int, default=15_000)
    packing.add_argument("--test-images", type=int, default=5_000)
    running = commands.add_parser("run", help="measure (on the GPU machine)")
    running.add_argument("--data", type=Path, default=Path("data/gpu_check.npz"))
    running.add_argument("--out", type=Path, help="the report as JSON")
    running.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    running.add_argument("--preset", default="attention92")
    running.add_argument("--batch-size", type=int, default=128)
    running.add_argument("--lr", type=float, default=0.2)
    running.add_argument("--steps", type=int, default=40, help="timed steps per mode")
    running.add_argument("--warmup-steps", type=int, default=5)
    running.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    running.add_argument("--accuracy-epochs", type=int, default=10, help="0: no accuracy run")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.prepared, args.out, args.train_images, args.test_images)
    else:
        run(args)


if __name__ == "__main__":
    main()
