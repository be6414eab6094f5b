"""The training step's guard against divergence, the learning-rate schedules, weight decay
groups, and resuming from a training state."""

from __future__ import annotations

import pytest
import torch

from resattn import create_model
from resattn.data import Normalization
from resattn.training import (
    NonFiniteLossError,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    grad_scaler,
    lr_factor,
    parameter_groups,
    restore_training_state,
    train_epoch,
    training_state,
)

NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def one_epoch(lr: float, epoch: int = 0, **options):
    torch.manual_seed(0)
    model = create_model("attention56_tiny")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    optimizer = build_optimizer(model, "sgd", lr, momentum=0.0)
    scheduler = build_scheduler(optimizer, total_steps=4, schedule="constant")
    try:
        return train_epoch(model, optimizer, scheduler, images, labels, NORM, batch_size=16, seed=0, epoch=epoch,
                           **options)
    except NonFiniteLossError as error:
        return error


def test_a_diverging_run_stops_at_the_first_non_finite_loss_naming_epoch_and_step():
    error = one_epoch(lr=1e30, epoch=2)  # the first update makes the weights huge
    assert isinstance(error, NonFiniteLossError)
    assert (error.epoch, error.step) == (2, 1)  # step 0's update blows up the weights; step 1's loss is nan
    message = str(error)
    assert message.startswith("the training loss became nan at epoch 3, step 2 of 4;")
    assert "\n" not in message


def test_without_a_check_per_step_a_diverged_epoch_is_stopped_at_its_end_naming_the_first_bad_step():
    """The GPU's way (no host sync per step), run on the CPU."""
    error = one_epoch(lr=1e30, epoch=2, check_loss_each_step=False)
    assert isinstance(error, NonFiniteLossError) and (error.epoch, error.step) == (2, 1)
    assert str(error).startswith("the training loss became not finite at epoch 3, step 2 of 4;")


def test_a_healthy_epoch_is_not_stopped():
    result = one_epoch(lr=0.01)
    assert result.images == 64 and 0.0 < result.loss < 10.0


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("constant", 50, 1.0), ("step", 59, 1.0), ("step", 60, 0.1), ("step", 90, 0.01),
     ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("onecycle", 0, 0.1), ("onecycle", 9, 1.0), ("onecycle", 55, 0.5)],
)
def test_learning_rate_schedules(schedule, step, expected):
    warmup = 10 if schedule == "onecycle" else 0
    factor = lr_factor(step, 100, schedule, warmup_steps=warmup, milestones=[60, 90], gamma=0.1)
    assert factor == pytest.approx(expected)


def test_weight_decay_spares_norm_and_bias_unless_asked():
    model = create_model("attention56_tiny")
    decay, no_decay = parameter_groups(model, 5e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (everything,) = parameter_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(model.parameters()))


def _setup():
    torch.manual_seed(0)
    model = create_model("attention56_tiny")
    optimizer = build_optimizer(model, "sgd", 0.05)
    scheduler = build_scheduler(optimizer, total_steps=8, schedule="onecycle", warmup_steps=2)
    return model, optimizer, scheduler


def test_a_restored_training_state_continues_exactly_as_an_uninterrupted_run():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10

    def epoch(objects, number):
        return train_epoch(*objects, images, labels, NORM, batch_size=16, seed=0, epoch=number)

    straight = _setup()
    epoch(straight, 0)
    expected = epoch(straight, 1)

    first = _setup()
    epoch(first, 0)
    state = training_state(*first, epoch=0, history=[{"epoch": 1}])
    resumed = _setup()
    assert restore_training_state(state, *resumed) == (1, [{"epoch": 1}])
    assert epoch(resumed, 1).loss == expected.loss
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)


def test_mixed_precision_is_bf16_on_a_cpu_and_fp32_when_off():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, True) == torch.bfloat16 and autocast_dtype(cpu, False) is None
    assert not grad_scaler(cpu, torch.bfloat16).is_enabled()  # bf16 needs no loss scaling


def test_fp16_trains_with_a_loss_scale_that_the_training_state_carries():
    """The path of GPUs without bf16, run on the CPU: fp16 autocast with a GradScaler, whose
    scale and growth count resume with the run."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    model, optimizer, scheduler = _setup()
    scaler = grad_scaler(torch.device("cpu"), torch.float16)
    result = train_epoch(model, optimizer, scheduler, images, labels, NORM, batch_size=16, seed=0, epoch=0,
                         autocast_dtype=torch.float16, scaler=scaler)
    assert scaler.is_enabled() and 0.0 < result.loss < 10.0
    state = training_state(model, optimizer, scheduler, 0, [], scaler)
    assert state["grad_scaler"]["_growth_tracker"] == 4  # one per step without an overflow
    resumed = grad_scaler(torch.device("cpu"), torch.float16)
    restore_training_state(state, *_setup(), resumed)
    assert resumed.state_dict() == scaler.state_dict()
