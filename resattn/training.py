"""The training step, evaluation and the training state a checkpoint holds: plain torch, used
by every runner.

Runners (the Ray Train worker loop, benchmarks, tests) own the process group and the logging;
this module owns what one epoch means. Metrics are summed across workers when a process group
is up, so every worker sees the global figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from resattn.data import (Normalization, alternating_flips, epoch_batches, normalize, random_crop_flip,
                          resize_images)
from resattn.model import ResidualAttentionNet, create_model

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("step", "cosine", "onecycle", "constant")


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, decay_norm_and_bias: bool,
                     norm_and_bias_lr_multiplier: float = 1.0) -> list[dict]:
    """Two groups: conv and linear weights; BN parameters and biases. The second gets weight
    decay only with `decay_norm_and_bias` (the paper decays everything; sparing BN and biases
    is one of the fast-training tricks) and its learning rate times `norm_and_bias_lr_multiplier`
    (airbench trains them faster)."""
    weights = [parameter for parameter in model.parameters() if parameter.ndim > 1]
    norm_and_bias = [parameter for parameter in model.parameters() if parameter.ndim <= 1]
    return [
        {"params": weights, "lr": lr, "weight_decay": weight_decay},
        {"params": norm_and_bias, "lr": lr * norm_and_bias_lr_multiplier,
         "weight_decay": weight_decay if decay_norm_and_bias else 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    decay_norm_and_bias: bool = True,
    norm_and_bias_lr_multiplier: float = 1.0,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """`capturable`: an SGD whose step a CUDA graph can hold (`GraphedStep`): fused, with each
    group's learning rate in a tensor on the parameters' device, which the scheduler fills
    every step, where a float would be frozen into the graph."""
    groups = parameter_groups(model, lr, weight_decay, decay_norm_and_bias, norm_and_bias_lr_multiplier)
    if capturable:
        if name != "sgd":
            raise ValueError(f"a CUDA-graphed step supports the sgd optimizer only, not {name!r}")
        device = next(model.parameters()).device
        for group in groups:
            group["lr"] = torch.tensor(group["lr"], dtype=torch.float32, device=device)
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=nesterov and momentum > 0,
                               fused=True)
    # foreach: one kernel per parameter group instead of one per tensor (hundreds here).
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, foreach=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def set_batchnorm_momentum(model: nn.Module, momentum: float) -> None:
    """The weight of each batch's statistics in every BN layer's running estimate (torch's
    default 0.1; airbench uses 0.6, so the estimate follows the fast-changing weights)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def training_model(preset: str, model_kwargs: dict | None = None, *, bn_momentum: float = 0.1,
                   channels_last: bool = False, device: torch.device = torch.device("cpu")) -> ResidualAttentionNet:
    """A recipe's model as it starts training, before a runner wraps it (DDP, torch.compile):
    the preset with its arguments, every BN layer's momentum set, on `device`, and in
    channels_last memory format where asked (oneDNN and cuDNN convolve NHWC fastest:
    BENCHMARKS.md). Seed torch before calling it for the same initial weights."""
    model = create_model(preset, **(model_kwargs or {})).to(device)
    set_batchnorm_momentum(model, bn_momentum)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights and BN statistics, to be updated
    after every optimizer step (`train_epoch` does) and validated and kept in place of the
    weights themselves; None when `decay` is 0 (off)."""
    if not decay:
        return None
    return AveragedModel(unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str,
    *,
    warmup_steps: int = 0,
    milestones: Iterable[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based).

    step: gamma ** (milestones passed); cosine: half a cosine to zero; onecycle: linear up
    over the warm-up, then linear down to zero (the triangular one-cycle of fast CIFAR
    training); constant: 1. Every schedule but onecycle may add a linear warm-up.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def build_scheduler(optimizer: torch.optim.Optimizer, **factor_kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **factor_kwargs))


def schedule_factor(schedule: dict, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """`lr_factor` at each optimizer step of a recipe's `train.schedule` section (as params.yaml
    spells it) over `epochs` epochs of `steps_per_epoch` steps."""
    steps = dict(total_steps=steps_per_epoch * epochs, schedule=schedule["name"],
                 warmup_steps=round(schedule["warmup_epochs"] * steps_per_epoch),
                 milestones=[round(m * steps_per_epoch) for m in schedule["milestones"]], gamma=schedule["gamma"])
    return lambda step: lr_factor(step, **steps)


def optimizer_and_scheduler(model: nn.Module, optimizer: dict, schedule: dict, epochs: int, steps_per_epoch: int,
                            *, capturable: bool = False
                            ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and per-step schedule of a recipe's `train.optimizer` and `train.schedule`
    sections (as params.yaml spells them), its epochs turned into optimizer steps."""
    settings = dict(optimizer)
    built = build_optimizer(model, settings.pop("name"), settings.pop("lr"), capturable=capturable, **settings)
    return built, torch.optim.lr_scheduler.LambdaLR(built, schedule_factor(schedule, epochs, steps_per_epoch))


def reschedule(scheduler: torch.optim.lr_scheduler.LambdaLR, factor: Callable[[int], float]) -> None:
    """Let `scheduler` go on from the step it is at with `factor` (`schedule_factor` for another
    epoch count). Only where the steps taken and the next one have the same factor under both
    (resattn.budget.trains_alike) is the run then the one a schedule built for the new count
    trains: the learning rate already set for the next step is the old factor's."""
    scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)


@dataclass
class EpochResult:
    """Figures over all workers: `images` is the global count, `seconds` this worker's time."""

    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class NonFiniteLossError(ArithmeticError):
    """The training loss stopped being a finite number: the run diverged."""

    def __init__(self, value: str, epoch: int, step: int, steps: int):
        self.epoch, self.step = epoch, step
        super().__init__(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} of {steps}; "
                         f"the run diverged (lower train.optimizer.lr, or add warm-up)")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduced(values: tuple[float, ...], device: torch.device, op: dist.ReduceOp) -> list[float]:
    reduced = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(reduced, op=op)
    return reduced.tolist()


def global_sums(*values: float, device: torch.device) -> list[float]:
    """`values` summed over every worker of the process group (as they are without one)."""
    return _all_reduced(values, device, dist.ReduceOp.SUM)


def global_maxima(*values: float, device: torch.device) -> list[float]:
    """The largest of every worker's `values` (as they are without a process group)."""
    return _all_reduced(values, device, dist.ReduceOp.MAX)


def global_minima(*values: float, device: torch.device) -> list[float]:
    """The smallest of every worker's `values` (as they are without a process group)."""
    return _all_reduced(values, device, dist.ReduceOp.MIN)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every worker, as the checkpoint and
    the model file keep them. DDP broadcasts them only at the start of a training forward pass,
    which then moves each worker's copy by its own batch: validated without this, a 2-worker
    CIFAR-10 run reported 92.44% for a model file that scores 92.62%."""
    if _distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _non_finite(loss: torch.Tensor) -> str | None:
    """How this step's loss is not finite on some worker ("nan", "inf"), else None. Every
    worker gets the same answer at the same step (one scalar all-reduce), so all stop together
    and none is left waiting in the next step's gradient all-reduce."""
    value = loss.detach().float()
    bad = (~torch.isfinite(value)).to(torch.float64).reshape(1)
    if _distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():  # one host sync per step: on a CPU the step has finished anyway
        return None
    return str(value.item()) if not math.isfinite(value.item()) else "not finite on another worker"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 on this CPU's own instructions (AVX-512 or AMX)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """What `mixed_precision` trains in on `device`: bf16 on GPUs that have it (Ampere and
    later), else fp16, which needs a GradScaler (`grad_scaler`); bf16 on a CPU with native bf16;
    None: fp32. A CPU without it (AVX2 only) emulates bf16: attention56_narrow trained at 15.8
    img/s in bf16 against 98.2 in fp32 on a 2-core AMD EPYC (BENCHMARKS.md), so it gets fp32."""
    if not mixed_precision:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def precision_name(dtype: torch.dtype | None) -> str:
    """How logs and reports name the arithmetic `autocast_dtype` chose ("float32" for None)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16, whose gradients underflow without it; disabled (a no-op) for
    bf16 and fp32, which have fp32's exponent range. It costs one host sync per step."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def forward_and_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0,
                     autocast_dtype: torch.dtype | None = None, cast_cache: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step's logits and cross-entropy loss, under autocast where `autocast_dtype`
    is given (`cast_cache`: autocast's cache of cast weights; off inside a CUDA graph)."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None,
                        cache_enabled=cast_cache):
        logits = model(x)
        return logits, F.cross_entropy(logits, y, label_smoothing=label_smoothing)


class GraphedStep:
    """The training step (forward, loss, backward, optimizer step) captured in a CUDA graph per
    input shape and replayed: one launch a step instead of one per kernel. Attention-92's eager
    step launches ~3,600 kernels, and on an H200 machine the host issued them slower than the
    GPU ran them at every batch size up to 1024 (BENCHMARKS.md, "Where a step's time goes").

    For one process on a CUDA device, with the plain model (no DDP, no torch.compile) and an
    optimizer built with `capturable=True`. A new shape first runs `WARMUP_STEPS` real steps
    eagerly on a side stream (cuDNN's algorithm search, the optimizer's momentum buffers), as
    torch's whole-network capture requires, then is captured; the step that captures it is
    replayed at once, so every call trains on its batch exactly once. Restore checkpoints into
    the model and optimizer before the first call: a graph holds their tensors' addresses.
    """

    WARMUP_STEPS = 3

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, label_smoothing: float = 0.0,
                 autocast_dtype: torch.dtype | None = None):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"a CUDA-graphed step needs the model on a CUDA device, not {device}")
        if unwrap(model) is not model:
            raise ValueError("a CUDA-graphed step takes the plain model, not a DDP or compiled wrapper")
        if not all(isinstance(group["lr"], torch.Tensor) for group in optimizer.param_groups):
            raise ValueError("a CUDA-graphed step needs an optimizer built with capturable=True")
        if autocast_dtype == torch.float16:
            raise ValueError("a CUDA-graphed step trains in bf16 or fp32: fp16's loss scaling reads the GPU every step")
        self.model, self.optimizer = model, optimizer
        self.label_smoothing, self.autocast_dtype = label_smoothing, autocast_dtype
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.side_stream = torch.cuda.Stream(device)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No cast cache: casts cached while capturing would be replayed from stale weights (torch's
        # CUDA graphs notes); each weight is cast once a step here anyway.
        logits, loss = forward_and_loss(self.model, x, y, label_smoothing=self.label_smoothing,
                                        autocast_dtype=self.autocast_dtype, cast_cache=False)
        loss.backward()
        self.optimizer.step()
        return logits, loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step on (x, y): the logits and the loss, detached."""
        shape = (tuple(x.shape), tuple(x.stride()), x.dtype)
        if shape not in self.graphs:
            self.optimizer.zero_grad(set_to_none=True)
            if self.eager_steps.get(shape, 0) < self.WARMUP_STEPS:
                self.eager_steps[shape] = self.eager_steps.get(shape, 0) + 1
                self.side_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side_stream):
                    logits, loss = self._step(x, y)
                torch.cuda.current_stream().wait_stream(self.side_stream)
                return logits.detach(), loss.detach()
            static_x, static_y = x.clone(), y.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits, loss = self._step(static_x, static_y)
            self.graphs[shape] = (graph, static_x, static_y, logits.detach(), loss.detach())
        graph, static_x, static_y, logits, loss = self.graphs[shape]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return logits, loss


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Normalization,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    label_smoothing: float = 0.0,
    device: torch.device = torch.device("cpu"),
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    average: AveragedModel | None = None,
    alternating_flip: bool = False,
    image_size: int | None = None,
    check_loss_each_step: bool | None = None,
    progress: Callable[[int], None] | None = None,
    graphed: GraphedStep | None = None,
    steps: int | None = None,
) -> EpochResult:
    """One pass over this worker's shard: augment, forward, backward, step, per batch.

    `images` is the whole uint8 NCHW training set (on CPU or already on `device`); `batch_size`
    is per worker. The shuffle and the augmentation are fixed by (seed, epoch, rank), so a run
    resumed at an epoch boundary replays exactly what an uninterrupted run would have done.
    With the images on a GPU, they are drawn there too, and a bf16 or fp32 step makes no host
    synchronisation at all: the host queues steps ahead of the GPU. `scaler`: fp16's
    GradScaler (`grad_scaler`). `average`, if given (`weight_average`), is updated after every
    step. `alternating_flip` mirrors a fixed random half of the images in even epochs and the
    other half in odd ones (`alternating_flips`), instead of a fresh coin per image and epoch.
    `image_size`, if given, scales every augmented batch to that side (progressive resizing:
    `resattn.data.progressive_image_size`).
    `progress`, if given, is called after every batch with this worker's images so far.
    `graphed`, if given (a `GraphedStep` over `model` and `optimizer`), runs each step as a
    replayed CUDA graph; the loss is then checked at the end of the epoch.
    `steps`, if given, ends the epoch after its first `steps` batches (resattn.budget times the
    step so, on batches drawn from the whole set as an epoch's are).

    Raises NonFiniteLossError, on every worker at the same step, when the loss stops being
    finite: with `check_loss_each_step` (the default for images on a CPU, where the check costs
    nothing), before the update from that loss; otherwise (the default on a GPU, where a check
    per step would stall it every step) at the end of the epoch, naming the first such step: a
    diverged epoch is discarded anyway.
    """
    model.train()
    if check_loss_each_step is None:
        check_loss_each_step = images.device.type == "cpu"
    augment_rng = torch.Generator(device=images.device).manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    started = time.perf_counter()
    batches = list(epoch_batches(len(labels), batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                 device=images.device))[:steps]
    first_bad_step = torch.full((), len(batches), dtype=torch.int64, device=device)  # len: none yet
    flips = alternating_flips(len(labels), seed, epoch, device=images.device) if alternating_flip else None
    plain_model = unwrap(model) if average is not None else None
    for step, index in enumerate(batches):
        batch = random_crop_flip(images[index], augment_rng, flip=None if flips is None else flips[index])
        x = normalize(batch.to(device, non_blocking=True), norm)
        if image_size is not None:
            x = resize_images(x, image_size)
        x = x.contiguous(memory_format=memory_format)
        y = labels[index].to(device, non_blocking=True)
        if graphed is not None:  # the whole step at once: its loss can only be judged after the update
            logits, loss = graphed(x, y)
        else:
            logits, loss = forward_and_loss(model, x, y, label_smoothing=label_smoothing, autocast_dtype=autocast_dtype)
        if not check_loss_each_step or graphed is not None:
            bad = ~torch.isfinite(loss.detach())
            first_bad_step = torch.where(bad, first_bad_step.clamp(max=step), first_bad_step)
        elif (value := _non_finite(loss)) is not None:
            raise NonFiniteLossError(value, epoch, step, len(batches))
        if graphed is None:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        scheduler.step()
        if average is not None:
            average.update_parameters(plain_model)
        # Accumulate on the device: no host sync per batch.
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
        if progress is not None:
            progress(count)
    if not check_loss_each_step or graphed is not None:
        if _distributed():
            dist.all_reduce(first_bad_step, op=dist.ReduceOp.MIN)
        if (step := int(first_bad_step.item())) < len(batches):
            raise NonFiniteLossError("not finite", epoch, step, len(batches))
    loss_total, correct_total, count_total = global_sums(loss_sum.item(), correct.item(), count, device=device)
    return EpochResult(loss_total / max(count_total, 1), correct_total / max(count_total, 1), int(count_total),
                       time.perf_counter() - started)


def validates_after(epoch: int, epochs: int, every: int = 1) -> bool:
    """Whether `epoch` (0-based) of `epochs` ends with a validation: every `every`-th epoch, and
    always the last, whose figures go with the model file. A validation costs the same whatever
    the epoch's image side (the full-size split), so on a progressive-resizing ramp it is a large
    share of each early epoch: 16 s against 90 s of training at 12 px on a 2-core AVX2 CPU. The
    weights do not depend on it."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    predictions: torch.Tensor  # (N,) predicted class per image
    probabilities: torch.Tensor  # (N, classes)
    single_view_accuracy: float  # without TTA (what TTA adds is accuracy - this)


def translated_views(x: torch.Tensor, shift: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` moved `shift` pixels down-right and up-left, its edges mirrored in."""
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    return padded[:, :, : x.shape[2], : x.shape[3]], padded[:, :, 2 * shift :, 2 * shift :]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    norm: Normalization,
    *,
    batch_size: int = 500,
    flip_tta: bool = False,
    translate_tta: bool = False,
    device: torch.device = torch.device("cpu"),
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Loss and accuracy over a whole split (single process). With `flip_tta` the softmax of
    each image and its mirror image are averaged; with `translate_tta` that average gets equal
    weight with the mean of the same over the image moved 1 pixel either way along the diagonal
    (airbench's weighting; BENCHMARKS.md has what it bought here)."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    probabilities, single_view_correct = [], torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(labels), batch_size):
        x = normalize(images[start : start + batch_size].to(device), norm).contiguous(memory_format=memory_format)
        y = labels[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            single = model(x).float().softmax(1)
            single_view_correct += (single.argmax(1) == y).sum()

            def views_mean(view: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
                probs = model(view).float().softmax(1) if first is None else first
                return (probs + model(view.flip(3)).float().softmax(1)) / 2 if flip_tta else probs

            probs = views_mean(x, single)
            if translate_tta:
                moved = translated_views(x)
                probs = probs / 2 + (views_mean(moved[0]) + views_mean(moved[1])) / 4
        probabilities.append(probs)
    probabilities = torch.cat(probabilities).cpu()  # one copy to the host, at the end
    predictions = probabilities.argmax(1)
    loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), labels.cpu()).item()
    accuracy = (predictions == labels.cpu()).double().mean().item()
    return Evaluation(loss, accuracy, predictions, probabilities, single_view_correct.item() / max(len(labels), 1))


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP or torch.compile wrappers (what checkpoints store)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                   epoch: int, history: list[dict], scaler: torch.amp.GradScaler | None = None,
                   average: AveragedModel | None = None) -> dict:
    """Everything that resumes training after `epoch` (0-based) exactly: weights, optimizer and
    schedule state, fp16's loss scale, the weight average, the RNG, and the per-epoch metrics
    so far. Tensors and plain values only, so it loads with `weights_only`."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "epoch": epoch,
        "history": history,
    }
    if scaler is not None and scaler.is_enabled():
        state["grad_scaler"] = scaler.state_dict()
    if average is not None:
        state["weight_average"] = average.state_dict()
    return state


def restore_training_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           scaler: torch.amp.GradScaler | None = None,
                           average: AveragedModel | None = None) -> tuple[int, list[dict]]:
    """Load a `training_state` into the objects; returns (the epoch to start at, the history)."""
    unwrap(model).load_state_dict(state["model"])
    device_lrs = [group["lr"] for group in optimizer.param_groups]  # tensors where the optimizer is capturable
    optimizer.load_state_dict(state["optimizer"])
    for group, device_lr in zip(optimizer.param_groups, device_lrs):
        if isinstance(device_lr, torch.Tensor):  # the loaded value, kept on the parameters' device
            group["lr"] = device_lr.copy_(torch.as_tensor(group["lr"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    if average is not None:
        average.load_state_dict(state["weight_average"])
    torch.set_rng_state(state["torch_rng"].cpu())
    return state["epoch"] + 1, state["history"]


def trained_weights(state: dict) -> dict[str, torch.Tensor]:
    """The weights a `training_state` was validated with, as the model's own state dict: its
    weight average's when it keeps one, else the weights themselves."""
    if "weight_average" not in state:
        return state["model"]
    prefix = "module."
    return {key.removeprefix(prefix): value for key, value in state["weight_average"].items() if key.startswith(prefix)}
