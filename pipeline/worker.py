"""What each Ray Train worker runs: `train_loop_per_worker`, for a training run and for every
sweep trial alike (pipeline/cluster.py builds the one trainer that runs it).

Each worker takes its shard of every batch (DDP), validates its slice of the validation split
(after every epoch, or every `train.validate_every`-th and the last), and all-reduces the sums,
so every worker sees the global figures. Rank 0 prints one line per epoch (and a progress line
every 20 s within it) and reports the full training state as a checkpoint; the controller logs
the epoch to MLflow once every worker has reported it (pipeline/tracking.py, `EpochLogger`). A
non-finite loss ends every worker's loop at the same step with a divergence record instead of a
checkpoint.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from pipeline.checkpoints import EPOCHS_KEY, load_resumable_state, report_state
from pipeline.config import Params, TrainConfig
from pipeline.tracking import start_system_metrics, stop_system_metrics, tag_run
from resattn.budget import (ImageSide, epochs_within, fitting_epochs, image_sides, measure_rates, planned_seconds,
                            trains_alike)
from resattn.cifar10 import Split
from resattn.data import Normalization, progressive_image_size, to_tensor_nchw
from resattn.training import (
    EpochResult,
    GraphedStep,
    NonFiniteLossError,
    autocast_dtype,
    broadcast_buffers,
    evaluate,
    global_minima,
    global_sums,
    grad_scaler,
    optimizer_and_scheduler,
    precision_name,
    reschedule,
    restore_training_state,
    schedule_factor,
    train_epoch,
    training_model,
    training_state,
    unwrap,
    validates_after,
    weight_average,
)

PROGRESS_SECONDS = 20.0
# The gradients live in DDP's all-reduce buckets instead of being copied into them and back
# after each all-reduce: one gradient-sized buffer less, and 4.9 ms of a 358 ms Attention-56
# step on 2 one-thread CPU workers (median of 6 interleaved rounds, 5 of them faster; within
# the noise of a 3-round run: benchmarks/ddp_overhead.py, BENCHMARKS.md).
DDP_OPTIONS = {"gradient_as_bucket_view": True}
# Beside a weight average, validation also scores the weights it averages, under these names
# (val_accuracy_unaveraged, val_loss_unaveraged): what the average buys, in one run.
UNAVERAGED_SUFFIX = "_unaveraged"


def use_reserved_cpus() -> int:
    """Run as many intra-op threads as CPUs Ray reserved for this worker; returns that count.

    Ray sets OMP_NUM_THREADS for a worker only once the worker process runs, which is too late
    when torch is already loaded (a set-up hook or an import is enough): OpenMP then keeps one
    thread per core. On 2 cores, two 1-CPU workers ran 4 busy threads and trained at 75-95
    instead of 341-439 img/s (BENCHMARKS.md). torch.set_num_threads here, in the thread that
    trains, holds whatever the environment."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(int(cpus), 1)
    torch.set_num_threads(threads)
    return threads


def worker_nodes() -> list[str]:
    """The ids of the Ray nodes the worker group runs on. (Ray Train's local ranks count
    machines by IP address, so the nodes of a cluster on one machine would be one.)"""
    node = ray.get_runtime_context().get_node_id()
    if not torch.distributed.is_initialized():
        return [node]
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, node)
    return sorted(set(every))


def report_divergence(reason: str, epoch: int, rank: int, history: list[dict]) -> None:
    """End every worker's loop normally, with the reason as the last checkpoint (the driver
    reads it; a rerun of the same params finds it and stops at once): a raised error would make
    Ray Train restart the workers, only to diverge again at the same step. A diverged run has
    no validation accuracy: NaN, which Tune's schedulers and searchers pass over."""
    metrics = {"epoch": epoch + 1, "val_accuracy": float("nan"), "diverged": 1.0}
    report_state(metrics, {"diverged": reason, "epoch": epoch, "history": history} if rank == 0 else None)


def epochs_in_budget(train_cfg: TrainConfig, model: nn.Module, throwaway_optimizer: Callable, image_side: ImageSide,
                     steps_per_epoch: int, train_images: torch.Tensor, train_labels: torch.Tensor,
                     val_images: torch.Tensor, val_labels: torch.Tensor, norm: Normalization, *,
                     per_worker_batch: int, rank: int, world_size: int, device: torch.device,
                     precision: torch.dtype | None) -> tuple[int, Callable[[EpochResult], int]]:
    """The most epochs, up to train.epochs, that fit train.minutes at the rates this worker
    group measures now (resattn.budget), and the correction of that count from the first
    epoch's own time; every worker gets the same counts."""
    fewest, most = train_cfg.fewest_epochs, train_cfg.epochs
    sides = image_sides(image_side, fewest, most)
    if rank == 0:
        print(f"time budget {train_cfg.minutes:g} min: measuring the training step at {', '.join(map(str, sides))} "
              f"px and a validation", flush=True)
    started = time.monotonic()
    rates = measure_rates(
        model, throwaway_optimizer, train_images, train_labels, val_images, val_labels, norm, sides=sides,
        batch_size=per_worker_batch, eval_batch_size=train_cfg.eval_batch_size, ema_decay=train_cfg.ema_decay,
        rank=rank, world_size=world_size, device=device, channels_last=train_cfg.channels_last,
        autocast_dtype=precision, label_smoothing=train_cfg.label_smoothing, alternating_flip=train_cfg.alternating_flip,
        scaler=grad_scaler(device, precision), graphed=train_cfg.cuda_graphs)
    plan = dict(images_per_epoch=steps_per_epoch * per_worker_batch * world_size, image_side=image_side,
                validate_every=train_cfg.validate_every, models_validated=2 if train_cfg.ema_decay else 1)
    epochs = epochs_within(train_cfg.minutes, rates, fewest=fewest, most=most, **plan)
    if rank == 0:
        print(f"time budget {train_cfg.minutes:g} min: {epochs} of at most {most} epochs fit, planned at "
              f"{planned_seconds(epochs, rates, **plan) / 60:.1f} min (measured in {time.monotonic() - started:.0f} s: "
              f"{rates.describe()})", flush=True)

    def after_first_epoch(result: EpochResult) -> int:
        """The count again, at the rates scaled to the first epoch's, among the counts whose
        first epoch trains as this one did (with a warm-up over the whole epoch, any)."""
        side = image_side(0, epochs)
        # The worker that started the epoch last waited for no other at its first step: rank 0
        # tags the MLflow run first, which made the others' first epoch of a tiny run 2.5x long.
        seconds_per_image = global_minima(result.seconds, device=device)[0] / result.images
        calibrated = rates.calibrated(side, seconds_per_image)
        factors = {count: schedule_factor(train_cfg.schedule.model_dump(), count, steps_per_epoch)
                   for count in range(fewest, most + 1)}
        alike = [count for count in factors if trains_alike(
            epochs, count, epochs_done=1, steps_per_epoch=steps_per_epoch, image_side=image_side,
            validate_every=train_cfg.validate_every, lr_factor=lambda step, total: factors[total](step))]
        corrected = max(fitting_epochs(train_cfg.minutes, calibrated, alike, **plan), default=min(alike))
        if rank == 0:
            print(f"time budget {train_cfg.minutes:g} min: epoch 1 trained at {1 / seconds_per_image:.0f} img/s at "
                  f"{side} px against {1 / rates.seconds_per_image[side]:.0f} measured: {corrected} epochs, planned "
                  f"at {planned_seconds(corrected, calibrated, **plan) / 60:.1f} min"
                  + (" (no other count trains its first epoch alike: the count stays)" if alike == [epochs] else ""),
                  flush=True)
        return corrected

    return epochs, after_first_epoch


def train_loop_per_worker(config: dict) -> None:
    threads = use_reserved_cpus()
    params = Params.model_validate(config["params"])
    train_cfg = params.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    precision = autocast_dtype(device, train_cfg.mixed_precision)
    scaler = grad_scaler(device, precision)

    train_split, val_split, norm = ray.get(config["data"])  # read-only views of the object store
    if train_cfg.train_subset:
        train_split = Split(train_split.images[: train_cfg.train_subset], train_split.labels[: train_cfg.train_subset])
    train_images, train_labels = to_tensor_nchw(train_split.images), torch.tensor(train_split.labels)
    # Each worker validates its own slice; the sums are combined below.
    val_images = to_tensor_nchw(val_split.images[rank::world_size])
    val_labels = torch.tensor(val_split.labels[rank::world_size])
    if device.type == "cuda":  # the whole dataset fits on any GPU: no host-to-device copy per batch
        train_images, train_labels = train_images.to(device), train_labels.to(device)
        val_images, val_labels = val_images.to(device), val_labels.to(device)
        # Shapes never change within a run: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(train_cfg.seed)
    model = training_model(params.model.preset, params.model.build_kwargs(), bn_momentum=train_cfg.bn_momentum,
                           channels_last=train_cfg.channels_last, device=device)
    if train_cfg.sync_batchnorm:  # batch statistics over every worker's share of the batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=DDP_OPTIONS)
    if train_cfg.compile:  # the DDP model, so that compiled graphs break at its gradient buckets
        model = torch.compile(model)
    per_worker_batch = train_cfg.batch_size // world_size
    steps_per_epoch = (len(train_labels) // world_size) // per_worker_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_labels)} training images make no batch of {train_cfg.batch_size}")
    total_images = steps_per_epoch * per_worker_batch * world_size
    resizing = train_cfg.progressive_resizing
    image_side = functools.partial(progressive_image_size, full_size=train_images.shape[-1],
                                   start_size=resizing.start_size, full_size_at=resizing.full_size_at)

    def recipe_optimizer(epochs: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        return optimizer_and_scheduler(model, train_cfg.optimizer.model_dump(), train_cfg.schedule.model_dump(),
                                       epochs, steps_per_epoch, capturable=train_cfg.cuda_graphs)

    state = load_resumable_state(checkpoint) if (checkpoint := ray.train.get_checkpoint()) else None
    if state is not None and "diverged" in state:
        report_divergence(state["diverged"], state["epoch"], rank, state["history"])
        return
    correct_budget = None
    if state is not None:  # the count the run started with, whatever a budget would choose now
        epochs = state.get(EPOCHS_KEY, train_cfg.epochs)
    elif train_cfg.minutes:
        epochs, correct_budget = epochs_in_budget(
            train_cfg, model, functools.partial(recipe_optimizer, train_cfg.epochs), image_side, steps_per_epoch,
            train_images, train_labels, val_images, val_labels, norm, per_worker_batch=per_worker_batch, rank=rank,
            world_size=world_size, device=device, precision=precision)
    else:
        epochs = train_cfg.epochs
    optimizer, scheduler = recipe_optimizer(epochs)
    average = weight_average(model, train_cfg.ema_decay)
    start_epoch, history = 0, []
    if state is not None:
        start_epoch, history = restore_training_state(state, model, optimizer, scheduler, scaler, average)
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {start_epoch}", flush=True)
    # After any restore: the graphs hold the model's and optimizer's tensors where they are now.
    graphed = (GraphedStep(model, optimizer, label_smoothing=train_cfg.label_smoothing, autocast_dtype=precision)
               if train_cfg.cuda_graphs else None)

    nodes = worker_nodes()
    if rank == 0:
        # Where the (latest) worker group ran, for the run's page: an elastic run's changes; and
        # how many epochs it trains, which a time budget chooses.
        tag_run(config["tracking_uri"], config["run_id"], {"ray_nodes": ",".join(nodes), "epochs": str(epochs)})
        arithmetic = precision_name(precision)
        if train_cfg.mixed_precision and precision is None:
            arithmetic += " (train.mixed_precision: this CPU has no native bf16, which it would emulate 6x slower)"
        print(f"{world_size} worker(s) x {threads} CPU thread(s) on {device.type}, on {len(nodes)} node(s), in "
              f"{arithmetic}; {total_images:,} training images per epoch in batches of {per_worker_batch * world_size}",
              flush=True)
    sampling = rank == 0 and start_system_metrics(config["tracking_uri"], config["run_id"])
    try:
        for epoch in itertools.count(start_epoch):
            if epoch >= epochs:  # read each time: a time budget may correct the count after the first epoch
                break
            epoch_started = time.monotonic()
            last_print = [epoch_started]

            def progress(done: int, epoch: int = epoch) -> None:
                if rank == 0 and time.monotonic() - last_print[0] >= PROGRESS_SECONDS:
                    last_print[0] = time.monotonic()
                    print(f"  epoch {epoch + 1}: {done * world_size:,}/{total_images:,} images", flush=True)

            lr = float(optimizer.param_groups[0]["lr"])  # a tensor on the GPU with cuda_graphs
            image_size = image_side(epoch, epochs)
            try:
                result = train_epoch(
                    model, optimizer, scheduler, train_images, train_labels, norm,
                    batch_size=per_worker_batch, seed=train_cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                    label_smoothing=train_cfg.label_smoothing, device=device, channels_last=train_cfg.channels_last,
                    autocast_dtype=precision, scaler=scaler, average=average,
                    alternating_flip=train_cfg.alternating_flip, image_size=image_size, progress=progress,
                    graphed=graphed,
                )
            except NonFiniteLossError as error:
                report_divergence(str(error), epoch, rank, history)
                return
            if correct_budget is not None and epoch == 0 and (corrected := correct_budget(result)) != epochs:
                epochs = corrected
                reschedule(scheduler, schedule_factor(train_cfg.schedule.model_dump(), epochs, steps_per_epoch))
                if rank == 0:
                    tag_run(config["tracking_uri"], config["run_id"], {"epochs": str(epochs)})
            metrics = {"epoch": epoch + 1, "train_loss": result.loss, "train_accuracy": result.accuracy}
            if validates_after(epoch, epochs, train_cfg.validate_every):
                # What the model file keeps; beside a weight average, the weights it averages too.
                validated = ({"": unwrap(model)} if average is None
                             else {"": average.module, UNAVERAGED_SUFFIX: unwrap(model)})
                for suffix, module in validated.items():
                    broadcast_buffers(module)  # each worker scores the weights the checkpoint keeps
                    val = evaluate(
                        module, val_images, val_labels, norm, batch_size=train_cfg.eval_batch_size,
                        device=device, channels_last=train_cfg.channels_last, autocast_dtype=precision,
                    )
                    val_loss, val_correct, val_count = global_sums(
                        val.loss * len(val_labels), val.accuracy * len(val_labels), len(val_labels), device=device)
                    metrics |= {f"val_loss{suffix}": val_loss / val_count,
                                f"val_accuracy{suffix}": val_correct / val_count}
            metrics |= {
                "lr": lr,
                "image_size": image_size,  # the side trained at (progressive resizing), validated at full size
                "images_per_second": result.images_per_second,  # images summed over workers
                "workers": world_size,  # an elastic run's may change from one epoch to the next
                "epoch_seconds": result.seconds,
                # Training and validation so far, across resumptions: the x of time-to-accuracy plots.
                "training_minutes": (history[-1]["training_minutes"] if history else 0.0)
                + (time.monotonic() - epoch_started) / 60,
            }
            history.append(metrics)
            if rank != 0:
                report_state(metrics, None)
                continue
            validation = (f"val loss {metrics['val_loss']:.4f} acc {metrics['val_accuracy']:.4f}" if "val_accuracy"
                          in metrics else f"validated every {train_cfg.validate_every} epochs")
            if f"val_accuracy{UNAVERAGED_SUFFIX}" in metrics:
                validation += f" (unaveraged weights {metrics[f'val_accuracy{UNAVERAGED_SUFFIX}']:.4f})"
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_accuracy']:.4f} | {validation} | {metrics['images_per_second']:.0f} img/s"
                + ("" if image_size == train_images.shape[-1] else f" at {image_size} px"),
                flush=True,
            )
            report_state(metrics, training_state(model, optimizer, scheduler, epoch, history, scaler, average)
                         | {EPOCHS_KEY: epochs})
            print(f"checkpoint saved for epoch {epoch + 1}", flush=True)
    finally:
        if sampling:
            stop_system_metrics()
