"""What each trick of the training recipe buys: the recipe of params.yaml trained in-process
with one trick changed at a time, side by side in one run, scored on the validation split
(never the test set: this is how the recipe is chosen). Prints each variant's validation
accuracy and its difference from the recipe; record results in BENCHMARKS.md.

    python benchmarks/recipe_ablation.py --epochs 5

The recipe is the quick-cpu profile composed from conf/ ( Attention-56 at half width, one-cycle
SGD, label smoothing 0.1, no weight decay on BN and biases, bf16, channels_last) with its
train/validation split; `--epochs` shortens or lengthens it. The recipe also runs with a second
seed, so a difference can be read against seed-to-seed spread. It runs in one process at the
global batch size, where the pipeline splits each batch over its Ray workers (DDP), so BN sees
batches of 128 here and of 64 there.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from pipeline.config import Params, load_params
from pipeline.worker import optimizer_and_scheduler
from resattn import cifar10, create_model
from resattn.data import Normalization, channel_stats, stratified_split, to_tensor_nchw
from resattn.training import evaluate, train_epoch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "cifar-10-batches-py"

# name -> params overrides on top of the recipe (as `dvc exp run -S` would set them)
VARIANTS = {
    "recipe": [],
    "recipe, seed 1": ["train.seed=1"],
    "no label smoothing": ["train.label_smoothing=0.0"],
    "weight decay on BN and biases too": ["train.optimizer.decay_norm_and_bias=true"],
    "cosine instead of one-cycle": ["train.schedule.name=cosine"],
    "zero-initialised residual branches": ["+model.overrides.zero_init_residual=true"],
}


def recipe_params(assignments: list[str] = ()) -> Params:
    """The params of `dvc exp run -S <assignments>`: conf/ composed, then `assignments`."""
    return load_params(ROOT / "params.yaml", assignments)


def train_variant(assignments: list[str], epochs: int, data: dict) -> tuple[list[float], float]:
    """(validation accuracy after each epoch, training seconds) of the recipe with `assignments`."""
    params = recipe_params([*assignments, f"train.epochs={epochs}"])
    cfg = params.train
    autocast_dtype = torch.bfloat16 if cfg.mixed_precision else None
    torch.manual_seed(cfg.seed)
    model = create_model(params.model.preset, **params.model.build_kwargs())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, labels = data["train"]
    optimizer, scheduler = optimizer_and_scheduler(model, cfg, steps_per_epoch=len(labels) // cfg.batch_size)
    curve, seconds = [], 0.0
    for epoch in range(epochs):
        result = train_epoch(model, optimizer, scheduler, images, labels, data["norm"], batch_size=cfg.batch_size,
                             seed=cfg.seed, epoch=epoch, label_smoothing=cfg.label_smoothing,
                             channels_last=cfg.channels_last, autocast_dtype=autocast_dtype)
        seconds += result.seconds
        val = evaluate(model, *data["val"], data["norm"], batch_size=cfg.eval_batch_size,
                       channels_last=cfg.channels_last, autocast_dtype=autocast_dtype)
        curve.append(val.accuracy)
        print(f"    epoch {epoch + 1}/{epochs}: val {val.accuracy:.4f}, {result.images_per_second:.0f} img/s", flush=True)
    return curve, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 python-version folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    params = recipe_params()
    train_full, _ = cifar10.load(args.data)  # the test split is not used
    train_index, val_index = stratified_split(train_full.labels, params.data.validation_size, params.data.split_seed)
    mean, std = channel_stats(train_full.images[train_index])
    data = {
        "train": (to_tensor_nchw(train_full.images[train_index]), torch.from_numpy(train_full.labels[train_index])),
        "val": (to_tensor_nchw(train_full.images[val_index]), torch.from_numpy(train_full.labels[val_index])),
        "norm": Normalization(tuple(mean), tuple(std)),
    }
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"profile {params.profile}: {params.model.preset}, {args.epochs} epochs, {len(train_index)} training and "
          f"{len(val_index)} validation images", flush=True)

    results = {}
    for name in args.variants:
        print(f"{name}:", flush=True)
        started = time.perf_counter()
        curve, seconds = train_variant(VARIANTS[name], args.epochs, data)
        results[name] = curve
        print(f"  final val accuracy {curve[-1]:.4f} ({seconds / 60:.1f} min of training, "
              f"{(time.perf_counter() - started) / 60:.1f} min in all)", flush=True)

    baseline = results.get("recipe")
    print("final validation accuracy" + (", and its difference from the recipe:" if baseline else ":"))
    for name, curve in results.items():
        delta = f"{100 * (curve[-1] - baseline[-1]):+.2f} points" if baseline and name != "recipe" else ""
        print(f"  {name:36s} {100 * curve[-1]:6.2f}%  {delta}")


if __name__ == "__main__":
    main()
