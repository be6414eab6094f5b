"""Fitting a training run to a time budget: measure how fast this machine trains at each image
side, then train the most epochs whose predicted time fits (`train.minutes`).

One profile cannot name an epoch count that fills an hour everywhere: the same Attention-56
recipe trained 34 epochs in 92.5 minutes on a 2-core Zen 4 and in 49-54 on a 2-core Zen 5
(BENCHMARKS.md). The rates are measured before training and the count chosen from them; the
first epoch, timed in the run itself, corrects it once, where that epoch trains the same for
every count (a warm-up over the whole epoch: `trains_alike`). From then on the count is fixed,
so the learning-rate schedule and the progressive-resizing ramp are planned for the whole run,
a run resumed from a checkpoint keeps the count it has, and `train.epochs=N` reproduces the
run exactly on any machine.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from resattn.data import Normalization
from resattn.training import (
    GraphedStep,
    evaluate,
    global_maxima,
    train_epoch,
    unwrap,
    validates_after,
    weight_average,
)

# Steps at a new image side before its timing starts: oneDNN and cuDNN choose and build their
# kernels for each new input shape on its first steps.
WARMUP_STEPS = 3

ImageSide = Callable[[int, int], int]  # (epoch, epochs) -> the side that epoch trains at


@dataclass(frozen=True)
class MeasuredRates:
    """Seconds per training image (all workers together) at each image side, and seconds per
    validation of the whole split, as measured by `measure_rates`."""

    seconds_per_image: dict[int, float]
    validation_seconds: float

    def describe(self) -> str:
        sides = ", ".join(f"{side} px {1 / seconds:.0f} img/s" for side, seconds in sorted(self.seconds_per_image.items()))
        return f"{sides}; a validation {self.validation_seconds:.1f} s"

    def calibrated(self, side: int, seconds_per_image: float) -> MeasuredRates:
        """These rates scaled alike so that `side` trains at `seconds_per_image`, as an epoch of
        the run itself did: the step timed before training missed the epochs' rates by 8-25% on
        a 2-core Zen 4 (12-22% slow at every side in one run) and by under 5% on a 2-core Xeon,
        where two starts measured 6% apart (BENCHMARKS.md)."""
        factor = seconds_per_image / self.seconds_per_image[side]
        return MeasuredRates({each: seconds * factor for each, seconds in self.seconds_per_image.items()},
                             self.validation_seconds * factor)


def image_sides(image_side: ImageSide, fewest: int, most: int) -> list[int]:
    """Every side some epoch trains at, for any epoch count from `fewest` to `most`."""
    return sorted({image_side(epoch, epochs) for epochs in range(fewest, most + 1) for epoch in range(epochs)})


def planned_seconds(epochs: int, rates: MeasuredRates, *, images_per_epoch: int, image_side: ImageSide,
                    validate_every: int = 1, models_validated: int = 1) -> float:
    """The time `epochs` epochs take at `rates`: each epoch's images at its side, and each
    validation (`validates_after`) of every validated model (2 with a weight average)."""
    training = sum(rates.seconds_per_image[image_side(epoch, epochs)] for epoch in range(epochs)) * images_per_epoch
    validations = sum(validates_after(epoch, epochs, validate_every) for epoch in range(epochs))
    return training + validations * models_validated * rates.validation_seconds


def fitting_epochs(minutes: float, rates: MeasuredRates, counts: Iterable[int], **plan) -> list[int]:
    """Those of `counts` whose `planned_seconds` (`plan`: its keyword arguments) fit `minutes`."""
    return [epochs for epochs in counts if planned_seconds(epochs, rates, **plan) <= minutes * 60]


def epochs_within(minutes: float, rates: MeasuredRates, *, fewest: int, most: int, **plan) -> int:
    """The most epochs, from `fewest` to `most`, that `planned_seconds` fits in `minutes`
    (`plan`: its keyword arguments). ValueError when not even `fewest` fit, naming their time."""
    fitting = fitting_epochs(minutes, rates, range(fewest, most + 1), **plan)
    if not fitting:
        needed = planned_seconds(fewest, rates, **plan) / 60
        raise ValueError(
            f"train.minutes {minutes:g} fits no run on this machine: the fewest epochs the schedule allows "
            f"({fewest}) would train for {needed:.1f} min at the rates measured ({rates.describe()}); give "
            f"train.minutes {needed:.1f} or more, or a smaller model")
    return max(fitting)


def trains_alike(epochs: int, other: int, *, epochs_done: int, steps_per_epoch: int,
                 lr_factor: Callable[[int, int], float], image_side: ImageSide, validate_every: int = 1) -> bool:
    """Whether a run of `other` epochs trains its first `epochs_done` epochs exactly as a run of
    `epochs` does: each at the same image side, validated alike, and the same learning-rate factor
    (`lr_factor(step, epochs)`) at every step, the next one's included. A run of `epochs` that
    has trained them can then become a run of `other` (its schedule rebuilt for `other`:
    resattn.training.reschedule) and still be the run `train.epochs=other` trains from scratch."""
    return (all(image_side(epoch, epochs) == image_side(epoch, other)
                and validates_after(epoch, epochs, validate_every) == validates_after(epoch, other, validate_every)
                for epoch in range(epochs_done))
            and all(lr_factor(step, epochs) == lr_factor(step, other)
                    for step in range(epochs_done * steps_per_epoch + 1)))


def training_seconds_per_image(
    model: nn.Module,
    optimizer_and_scheduler: Callable[[], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]],
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Normalization,
    *,
    sides: Iterable[int],
    batch_size: int,
    steps: int = 8,
    ema_decay: float = 0.0,
    graphed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device = torch.device("cpu"),
    label_smoothing: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    **step_options,
) -> dict[int, float]:
    """Seconds per training image (all workers together) at each of `sides`: `steps` steps of
    the run's own step, `train_epoch` cut short on batches drawn from all of `images`, timed
    after the warm-up (`WARMUP_STEPS`; with `graphed`, as many as a CUDA graph's capture takes).
    `model` is what trains (a DDP or compiled wrapper too; the plain model with `graphed`), with
    an optimizer and schedule from `optimizer_and_scheduler` (thrown away after), a weight average
    if `ema_decay` is set, and `step_options` (train_epoch's other keyword arguments, as the run
    gives them).
    `batch_size` is per worker, as train_epoch takes it. The weights, batch-norm statistics and
    torch's random state are restored afterwards: training starts from where it would have
    without the measuring. Every worker returns the slowest worker's figures."""
    weights = copy.deepcopy(unwrap(model).state_dict())
    random_state = torch.get_rng_state()
    optimizer, scheduler = optimizer_and_scheduler()
    average = weight_average(model, ema_decay)
    step = (GraphedStep(model, optimizer, label_smoothing=label_smoothing, autocast_dtype=autocast_dtype)
            if graphed else None)
    warmup_steps = GraphedStep.WARMUP_STEPS + 1 if graphed else WARMUP_STEPS
    common = dict(batch_size=batch_size, seed=0, rank=rank, world_size=world_size, device=device,
                  label_smoothing=label_smoothing, autocast_dtype=autocast_dtype, average=average, graphed=step,
                  **step_options)
    seconds_per_image = {}
    try:
        for side in sides:
            # Batches drawn from the whole set, as an epoch's are.
            train_epoch(model, optimizer, scheduler, images, labels, norm, image_size=side, epoch=0,
                        steps=warmup_steps, **common)
            result = train_epoch(model, optimizer, scheduler, images, labels, norm, image_size=side, epoch=1,
                                 steps=steps, **common)
            # The workers step together, at the slowest's pace.
            seconds_per_image[side] = global_maxima(result.seconds, device=device)[0] / result.images
    finally:
        unwrap(model).load_state_dict(weights)
        torch.set_rng_state(random_state)
    return seconds_per_image


def validation_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, norm: Normalization, *,
                       batch_size: int, **evaluate_options) -> float:
    """The seconds `evaluate` takes over all of `images` (the slowest worker's), from two timed
    batches after one untimed."""
    evaluate(model, images[:batch_size], labels[:batch_size], norm, batch_size=batch_size, **evaluate_options)
    timed = min(2 * batch_size, len(labels))
    started = time.perf_counter()
    evaluate(model, images[:timed], labels[:timed], norm, batch_size=batch_size, **evaluate_options)
    device = evaluate_options.get("device", torch.device("cpu"))
    return global_maxima((time.perf_counter() - started) * len(labels) / max(timed, 1), device=device)[0]


def measure_rates(model: nn.Module, optimizer_and_scheduler: Callable, images: torch.Tensor, labels: torch.Tensor,
                  val_images: torch.Tensor, val_labels: torch.Tensor, norm: Normalization, *, eval_batch_size: int,
                  device: torch.device = torch.device("cpu"), channels_last: bool = False,
                  autocast_dtype: torch.dtype | None = None, **training_options) -> MeasuredRates:
    """A run's rates: `training_seconds_per_image` (`training_options`: its other keyword
    arguments) and a validation of this worker's `val_images` with the plain model."""
    shared = dict(device=device, channels_last=channels_last, autocast_dtype=autocast_dtype)
    training = training_seconds_per_image(model, optimizer_and_scheduler, images, labels, norm, **shared,
                                          **training_options)
    validation = validation_seconds(unwrap(model), val_images, val_labels, norm, batch_size=eval_batch_size, **shared)
    return MeasuredRates(training, validation)
