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

`profile` (no data) times the step eager in bf16 at several batch sizes on random images drawn
on the device, and under torch.profiler sums its kernels' time and counts them: how much of the
step the GPU works, and which operators cost it and the host most. `--cuda-graphs` also times
the step replayed as a CUDA graph from the same start, and compares the two warm-up losses.

On a CPU (`--device cpu`) it runs the same code, which is how it is tested; the sync count,
memory and kernel figures are GPU-only and reported as null there.

A profile's whole recipe, on all of CIFAR-10 (the a92-gpu profile's 95%-in-10-minutes goal):

    python benchmarks/gpu_check.py pack-recipe --profile a92-gpu --out data/gpu_recipe   # here
    python benchmarks/gpu_check.py recipe --data data/gpu_recipe --out $OUT/recipe.json  # there

`pack-recipe` resolves the profile as the pipeline does (conf/, `-S key=value` on top) and
writes the 45,000 training and 10,000 test images of data/prepared in parts of at most
--part-mib (56: three parts; a device call carries at most 64 MiB, the repository included), each part
holding the recipe. Carry one part per call, in consecutive calls to the same warm machine
(an ignored file a call brought stays there for the next one); the last call runs `recipe`,
which checks that every part of the same pack is there, then trains the recipe's model with its
optimizer, schedule, batch, augmentation and precision (resattn's own functions, as the
pipeline's worker), prints every epoch, and scores the test set once with the recipe's TTA.
Its minutes are training and that one evaluation, torch only: the pipeline adds Ray's start-up.

`recipe --minutes M` fits the run to a wall-clock budget, for a device call that cannot be
repeated: before training it measures the recipe's step eager and, where the recipe compiles,
compiled (compilation included in the minutes), and where it sets `train.cuda_graphs`, replayed
as a CUDA graph; trains with the fastest, and cuts the recipe's epochs to what that rate fits in
M minutes with the scoring. Every rate goes into the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # resattn, from a bare copy of the repo

from resattn.budget import training_seconds_per_image  # noqa: E402
from resattn.cifar10 import Split  # noqa: E402
from resattn.data import Normalization, load_split, progressive_image_size, to_tensor_nchw  # noqa: E402
from resattn.training import (  # noqa: E402
    GraphedStep,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    evaluate,
    grad_scaler,
    optimizer_and_scheduler,
    precision_name,
    train_epoch,
    training_model,
    weight_average,
)

MODES = {  # name: (channels_last, mixed precision, compile)
    "eager fp32": (False, False, False),
    "channels_last + mixed precision": (True, True, False),
    "channels_last + mixed precision + compile": (True, True, True),
}


def name_of(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"


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


def pack_recipe(prepared: Path, out: Path, profile: str, assignments: list[str], part_mib: float) -> None:
    # The pipeline's config (pydantic, Hydra) exists here, not on the device: imported here only.
    from pipeline.config import DEFAULT_PARAMS, load_params

    params = load_params(REPOSITORY / DEFAULT_PARAMS, [f"profile={profile}", *assignments])
    recipe = {"profile": params.profile, "preset": params.model.preset, "model": params.model.build_kwargs(),
              "train": params.train.model_dump(), "evaluate": params.evaluate.model_dump()}
    train, test = load_split(prepared / "train.npz"), load_split(prepared / "test.npz")
    stats = json.loads((prepared / "stats.json").read_text())
    images, labels = np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])
    per_part = max(int(part_mib * 2**20) // images[0].nbytes, 1)
    parts = -(-len(labels) // per_part)
    content = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    content.update(images)  # the contiguous array's own buffer: no 169 MB copy
    digest = content.hexdigest()[:12]
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("part-*.npz"):  # another pack's parts would be mixed in: the loader refuses those
        stale.unlink()
    for index in range(parts):
        chunk = slice(index * per_part, (index + 1) * per_part)
        manifest = {"pack": digest, "part": index + 1, "parts": parts, "train_images": len(train),
                    "test_images": len(test), "mean": stats["mean"], "std": stats["std"], "recipe": recipe}
        np.savez(out / f"part-{index + 1}-of-{parts}.npz", images=images[chunk], labels=labels[chunk],
                 manifest=np.array(json.dumps(manifest)))
    sizes = ", ".join(f"{path.stat().st_size / 2**20:.1f}" for path in sorted(out.glob("part-*.npz")))
    print(f"wrote {out}: profile {params.profile}, {len(train)} training and {len(test)} test images in {parts} "
          f"part(s) of {sizes} MiB (pack {digest}); carry one part per device call", flush=True)


def load_recipe_pack(folder: Path) -> tuple[dict, Split, Split]:
    """The parts under `folder` joined, once every part of one pack is there."""
    found = {}
    for path in folder.glob("part-*-of-*.npz"):
        with np.load(path) as part:
            manifest = json.loads(str(part["manifest"]))
            found[path.name] = (manifest, part["images"], part["labels"])
    if not found:
        raise SystemExit(f"error: no part-K-of-N.npz in {folder}; make them with `pack-recipe` and carry them there")
    packs = {(manifest["pack"], manifest["parts"]) for manifest, _, _ in found.values()}
    if len(packs) > 1:
        raise SystemExit(f"error: {folder} mixes parts of different packs ({', '.join(sorted(found))}); "
                         f"pack again and carry every part of one pack")
    pack, parts = packs.pop()
    missing = [name for name in (f"part-{k}-of-{parts}.npz" for k in range(1, parts + 1)) if name not in found]
    if missing:
        raise SystemExit(f"error: {folder} lacks {', '.join(missing)} of pack {pack}: carry each part in a call to "
                         f"the same warm machine, one call after another")
    ordered = [found[f"part-{k}-of-{parts}.npz"] for k in range(1, parts + 1)]
    manifest = ordered[0][0]
    images = np.concatenate([images for _, images, _ in ordered])
    labels = np.concatenate([labels for _, _, labels in ordered])
    cut = manifest["train_images"]
    return manifest, Split(images[:cut], labels[:cut]), Split(images[cut:], labels[cut:])


class Trainer:
    """One model, optimizer and schedule in one mode, stepping through train_epoch."""

    def __init__(self, args, images: torch.Tensor, labels: torch.Tensor, norm: Normalization, *,
                 channels_last: bool, mixed: bool, compile: bool, epochs: int, graphs: bool = False):
        torch.manual_seed(0)
        self.model = training_model(args.preset, channels_last=channels_last, device=args.device)
        self.runner = torch.compile(self.model) if compile else self.model
        steps = len(labels) // args.batch_size
        self.optimizer = build_optimizer(self.model, "sgd", args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                         decay_norm_and_bias=False, capturable=graphs)
        self.scheduler = build_scheduler(self.optimizer, total_steps=steps * epochs, schedule="onecycle",
                                         warmup_steps=max(steps * epochs // 5, 1))
        self.dtype = autocast_dtype(args.device, mixed)
        self.scaler = grad_scaler(args.device, self.dtype)
        self.graphed = (GraphedStep(self.model, self.optimizer, label_smoothing=0.1, autocast_dtype=self.dtype)
                        if graphs else None)
        self.images, self.labels, self.norm, self.args = images, labels, norm, args
        self.channels_last = channels_last

    def epoch(self, epoch: int, count: int | None = None):
        count = count or len(self.labels)
        return train_epoch(self.runner, self.optimizer, self.scheduler, self.images[:count], self.labels[:count],
                           self.norm, batch_size=self.args.batch_size, seed=0, epoch=epoch, label_smoothing=0.1,
                           device=self.args.device, channels_last=self.channels_last, autocast_dtype=self.dtype,
                           scaler=self.scaler, graphed=self.graphed)


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
              "warmup_seconds": warmup_seconds, "precision": precision_name(trainer.dtype),
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
    device_name = name_of(args.device)
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


# Untimed steps before a step is timed: cuDNN's algorithm search, torch.compile's compilation,
# a CUDA graph's eager warm-up and capture.
WARMUP_BEFORE_TIMING = GraphedStep.WARMUP_STEPS + 1
BUDGET_MARGIN = 0.95  # a short measurement flatters: the clocks, the allocator and the host are warm


def step_rate(runner: torch.nn.Module, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              norm: Normalization, settings: dict, device: torch.device, dtype: torch.dtype | None,
              steps: int, *, graphs: bool = False) -> tuple[float, float]:
    """The recipe's training step through `runner` (replayed as a CUDA graph with `graphs`):
    img/s over `steps` steps after the warm-up, and the warm-up's seconds (compiling included),
    as resattn.budget times a run's step. It steps at a learning rate of 0, and `model`'s weights
    and BN buffers are put back, so the recipe trains from the same start."""
    def learning_nothing() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizer = build_optimizer(model, "sgd", 0.0, momentum=0.0, capturable=graphs)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    side = images.shape[-1]
    started = time.perf_counter()
    seconds_per_image = training_seconds_per_image(
        runner, learning_nothing, images, labels, norm, sides=[side], batch_size=settings["batch_size"], steps=steps,
        graphed=graphs, device=device, label_smoothing=settings["label_smoothing"], autocast_dtype=dtype,
        channels_last=settings["channels_last"], scaler=grad_scaler(device, dtype),
        alternating_flip=settings["alternating_flip"])[side]
    timed_seconds = steps * settings["batch_size"] * seconds_per_image
    return 1 / seconds_per_image, time.perf_counter() - started - timed_seconds


def epochs_within(minutes: float, spent_seconds: float, rate: float, train_images: int, batch_size: int,
                  scored_images: int) -> int:
    """How many epochs at `rate` img/s fit in what is left of `minutes` after `spent_seconds`
    and the scoring: `scored_images` forward passes, counted at the training step's rate (a
    forward pass costs about a third of a step: the rest is margin)."""
    epoch_seconds = train_images // batch_size * batch_size / rate
    left = minutes * 60 - spent_seconds - scored_images / rate
    return max(int(left * BUDGET_MARGIN / epoch_seconds), 0)


def profile_steps(args) -> None:
    """Where the step's time goes at each batch size, eager and with no data carried (random
    images drawn on the device): the real step's img/s (train_epoch in channels_last + mixed
    precision), then under torch.profiler the GPU's busy time (its kernels' times summed)
    against that step's wall time, kernels per step, and the operators costing most GPU and host
    time. A GPU busy for a small share of the step waits on the host to issue its kernels."""
    device = args.device
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit(f"error: --cuda-graphs needs a CUDA device, not {device}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline's workers do
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    device_name = name_of(device)
    print(f"# {device_name}, torch {torch.__version__}, {args.preset}, eager, {args.steps} timed and "
          f"{args.profiled_steps} profiled steps per batch size", flush=True)
    report = {"device": device_name, "torch": torch.__version__, "preset": args.preset, "batches": []}
    tables = []
    warmup_steps = max(args.warmup_steps, WARMUP_BEFORE_TIMING) if args.cuda_graphs else args.warmup_steps
    for batch_size in args.batch_sizes:
        settings = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
        generator = torch.Generator(device=device).manual_seed(0)
        count = batch_size * max(args.steps, args.profiled_steps, warmup_steps)
        images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, device=device, generator=generator)
        labels = torch.randint(0, 10, (count,), device=device, generator=generator)

        def timed(graphs: bool) -> tuple[Trainer, float, float]:
            trainer = Trainer(settings, images, labels, norm, channels_last=True, mixed=True, compile=False, epochs=1,
                              graphs=graphs)
            warmup = trainer.epoch(0, warmup_steps * batch_size)  # cuDNN's search; a graph's capture
            started = time.perf_counter()
            trainer.epoch(1, args.steps * batch_size)  # its loss read at the end waits for the GPU
            return trainer, (time.perf_counter() - started) * 1000 / args.steps, warmup.loss

        trainer, step_ms, warmup_loss = timed(graphs=False)
        with torch.profiler.profile(activities=activities) as profiler:
            trainer.epoch(2, args.profiled_steps * batch_size)
        operators = profiler.key_averages()
        # The kernels alone: an operator's own device time is its kernels' again.
        kernels_run = [op for op in operators if op.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(op.self_device_time_total for op in kernels_run) / 1000 / args.profiled_steps
        kernels = sum(op.count for op in kernels_run)
        row = {"batch_size": batch_size, "img_per_s": batch_size * 1000 / step_ms, "step_ms": step_ms,
               "gpu_busy_ms": busy_ms if device.type == "cuda" else None,
               "kernels_per_step": kernels / args.profiled_steps if device.type == "cuda" else None}
        busy = (f"; GPU busy {busy_ms:.1f} ms of it ({busy_ms / step_ms:.0%}), {row['kernels_per_step']:,.0f} kernels"
                if device.type == "cuda" else "")
        print(f"batch {batch_size:5}: {row['img_per_s']:9,.0f} img/s, {step_ms:.1f} ms a step{busy}", flush=True)
        if args.cuda_graphs:
            # The same weights, data and schedule: the warm-up epochs' losses should agree.
            _, graphed_ms, graphed_loss = timed(graphs=True)
            row.update(graphed_img_per_s=batch_size * 1000 / graphed_ms, graphed_step_ms=graphed_ms,
                       warmup_loss=warmup_loss, graphed_warmup_loss=graphed_loss)
            print(f"batch {batch_size:5}, CUDA graph: {row['graphed_img_per_s']:9,.0f} img/s, {graphed_ms:.1f} ms a "
                  f"step ({step_ms / graphed_ms:.2f}x eager); warm-up loss {graphed_loss:.4f} against eager's "
                  f"{warmup_loss:.4f}", flush=True)
        report["batches"].append(row)
        sort_keys = (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]
        tables += [f"## batch {batch_size}, by {key}\n{operators.table(sort_by=key, row_limit=args.rows)}"
                   for key in sort_keys]
    print("\n\n".join(tables), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def run_recipe(args) -> None:
    manifest, train, test = load_recipe_pack(args.data)
    recipe, device = manifest["recipe"], args.device
    settings = recipe["train"]
    if settings["cuda_graphs"] and device.type != "cuda":
        raise SystemExit(f"error: the recipe sets train.cuda_graphs, which needs a CUDA device, not {device}")
    epochs = args.epochs or settings["epochs"]
    norm = Normalization(tuple(manifest["mean"]), tuple(manifest["std"]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the pipeline's workers do
    device_name = name_of(device)
    print(f"# {device_name}, torch {torch.__version__}: profile {recipe['profile']} ({recipe['preset']}), {epochs} "
          f"epochs on {len(train)} training images, then {len(test)} test images once", flush=True)
    started = time.perf_counter()
    images, labels = to_tensor_nchw(train.images).to(device), torch.from_numpy(train.labels).to(device)
    torch.manual_seed(settings["seed"])
    model = training_model(recipe["preset"], recipe["model"], bn_momentum=settings["bn_momentum"],
                           channels_last=settings["channels_last"], device=device)
    dtype = autocast_dtype(device, settings["mixed_precision"])
    scaler = grad_scaler(device, dtype)
    runner = torch.compile(model) if settings["compile"] else model
    graphs = settings["cuda_graphs"]
    scoring = recipe["evaluate"]
    calibration = None
    if args.minutes:
        runners = {"eager": model, **({"compiled": runner} if settings["compile"] else {}),
                   **({"CUDA graph": model} if graphs else {})}
        calibration = {}
        for name, candidate in runners.items():
            try:
                rate, warmup = step_rate(candidate, model, images, labels, norm, settings, device, dtype,
                                         args.calibration_steps, graphs=name == "CUDA graph")
            except Exception as error:  # a compiler's or a capture's failure should cost its rate, not the call
                if name == "eager":
                    raise
                calibration[name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
                print(f"calibration, {name}: failed ({calibration[name]['error'][:300]}); training eager", flush=True)
                continue
            calibration[name] = {"img_per_s": rate, "warmup_seconds": warmup}
            print(f"calibration, {name}: {rate:,.0f} img/s over {args.calibration_steps} steps (warm-up {warmup:.0f} s)",
                  flush=True)
        chosen = max((name for name in calibration if "img_per_s" in calibration[name]),
                     key=lambda name: calibration[name]["img_per_s"])
        runner, graphs = runners[chosen], chosen == "CUDA graph"
        views = (1 + scoring["flip_tta"]) * (1 + 2 * scoring["translate_tta"])
        fitting = epochs_within(args.minutes, time.perf_counter() - started, calibration[chosen]["img_per_s"],
                                len(labels), settings["batch_size"], views * len(test))
        if fitting < 1:
            raise SystemExit(f"error: --minutes {args.minutes} fits no epoch: {time.perf_counter() - started:.0f} s "
                             f"are spent and the step trains {calibration[chosen]['img_per_s']:,.0f} img/s "
                             f"({chosen}); give more minutes")
        calibration.update(trained=chosen, epochs_fitting=fitting)
        epochs = min(epochs, fitting)
        print(f"training {chosen}: {epochs} epochs fit in {args.minutes} minutes (the recipe has "
              f"{settings['epochs']}, at most {fitting} fit)", flush=True)
    steps = len(labels) // settings["batch_size"]
    optimizer, scheduler = optimizer_and_scheduler(model, settings["optimizer"], settings["schedule"], epochs, steps,
                                                   capturable=graphs)
    average = weight_average(model, settings["ema_decay"])
    graphed = (GraphedStep(model, optimizer, label_smoothing=settings["label_smoothing"], autocast_dtype=dtype)
               if graphs else None)
    curve = []
    resizing = settings["progressive_resizing"]
    for epoch in range(epochs):
        image_size = progressive_image_size(epoch, epochs, images.shape[-1], resizing["start_size"],
                                            resizing["full_size_at"])
        result = train_epoch(runner, optimizer, scheduler, images, labels, norm, batch_size=settings["batch_size"],
                             seed=settings["seed"], epoch=epoch, label_smoothing=settings["label_smoothing"],
                             device=device, channels_last=settings["channels_last"], autocast_dtype=dtype,
                             scaler=scaler, average=average, alternating_flip=settings["alternating_flip"],
                             image_size=image_size, graphed=graphed)
        minutes = (time.perf_counter() - started) / 60
        curve.append({"epoch": epoch + 1, "train_loss": result.loss, "train_accuracy": result.accuracy,
                      "images_per_second": result.images_per_second, "minutes": minutes})
        print(f"epoch {epoch + 1}/{epochs}: train loss {result.loss:.4f} acc {result.accuracy:.4f} | "
              f"{result.images_per_second:,.0f} img/s | {minutes:.2f} min", flush=True)
    scored = model if average is None else average.module  # what the pipeline's model file keeps
    scores = evaluate(scored, to_tensor_nchw(test.images), torch.from_numpy(test.labels), norm,
                      batch_size=scoring["batch_size"], flip_tta=scoring["flip_tta"],
                      translate_tta=scoring["translate_tta"], device=device, channels_last=settings["channels_last"],
                      autocast_dtype=dtype)
    minutes = (time.perf_counter() - started) / 60
    report = {"device": device_name, "torch": torch.__version__, "pack": manifest["pack"], "recipe": recipe,
              "epochs": epochs, "minutes_budget": args.minutes, "calibration": calibration,
              "train_images": len(train), "test_images": len(test),
              "precision": precision_name(dtype), "minutes": minutes,
              "test_accuracy": scores.accuracy, "test_accuracy_single_view": scores.single_view_accuracy,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
              "curve": curve}
    print(f"recipe {recipe['profile']}: {scores.accuracy:.4f} test accuracy (single view "
          f"{scores.single_view_accuracy:.4f}) on {len(test)} test images after {epochs} epochs, "
          f"{minutes:.1f} min of training and scoring", flush=True)
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
    profiling = commands.add_parser("profile", help="where the step's time goes, per batch size (on the GPU machine)")
    profiling.add_argument("--out", type=Path, help="the report as JSON")
    profiling.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    profiling.add_argument("--preset", default="attention92")
    profiling.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    profiling.add_argument("--lr", type=float, default=0.2)
    profiling.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    profiling.add_argument("--warmup-steps", type=int, default=3)
    profiling.add_argument("--profiled-steps", type=int, default=3)
    profiling.add_argument("--rows", type=int, default=12, help="operators in each table")
    profiling.add_argument("--cuda-graphs", action="store_true",
                           help="also time the step captured in a CUDA graph (resattn.training.GraphedStep)")
    recipe_packing = commands.add_parser("pack-recipe", help="a profile's recipe and all of CIFAR-10, in parts")
    recipe_packing.add_argument("--profile", required=True, help="conf/profile/<name>.yaml, e.g. a92-gpu")
    recipe_packing.add_argument("-S", "--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                                help="a params override on top of the profile, as `dvc exp run -S`")
    recipe_packing.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="the preprocess stage's output")
    recipe_packing.add_argument("--out", type=Path, default=Path("data/gpu_recipe"), help="a folder for the parts")
    recipe_packing.add_argument("--part-mib", type=float, default=56.0, help="the most MiB of images in one part")
    recipe = commands.add_parser("recipe", help="train a packed recipe (on the GPU machine)")
    recipe.add_argument("--data", type=Path, default=Path("data/gpu_recipe"), help="the folder holding every part")
    recipe.add_argument("--out", type=Path, help="the report as JSON")
    recipe.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    recipe.add_argument("--epochs", type=int, default=0, help="0: the recipe's; fewer when the rate says so")
    recipe.add_argument("--minutes", type=float, default=0.0,
                        help="a wall-clock budget for the whole run: measure the step first, then train as many of "
                             "the recipe's epochs as fit (0: no budget)")
    recipe.add_argument("--calibration-steps", type=int, default=20, help="timed steps per runner, with --minutes")
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.prepared, args.out, args.train_images, args.test_images)
    elif args.command == "pack-recipe":
        pack_recipe(args.prepared, args.out, args.profile, args.assignments, args.part_mib)
    elif args.command == "recipe":
        run_recipe(args)
    elif args.command == "profile":
        profile_steps(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
