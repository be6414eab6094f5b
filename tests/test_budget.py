"""Fitting a run to a time budget (resattn.budget): the plan from measured rates, and the
measuring, which must leave the model as it found it."""

from __future__ import annotations

import functools

import pytest
import torch

from resattn import create_model
from resattn.budget import (MeasuredRates, epochs_within, fitting_epochs, image_sides, measure_rates, planned_seconds,
                            trains_alike)
from resattn.data import Normalization, progressive_image_size
from resattn.training import build_optimizer, build_scheduler, schedule_factor, train_epoch

NORM = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
# 16 px steps twice as fast as 32 px; a validation costs 10 s.
RATES = MeasuredRates({16: 0.001, 20: 0.0015, 24: 0.0015, 28: 0.0015, 32: 0.002}, validation_seconds=10.0)
FULL_SIZE_ONLY = dict(images_per_epoch=1000, image_side=lambda epoch, epochs: 32)


def test_a_plan_adds_each_epochs_images_at_its_side_and_each_validation():
    assert planned_seconds(3, RATES, **FULL_SIZE_ONLY) == pytest.approx(3 * 2.0 + 3 * 10.0)
    assert planned_seconds(3, RATES, **FULL_SIZE_ONLY, validate_every=2) == pytest.approx(6.0 + 2 * 10.0)
    # A weight average is validated beside the weights it averages: two validations each time.
    assert planned_seconds(3, RATES, **FULL_SIZE_ONLY, models_validated=2) == pytest.approx(6.0 + 6 * 10.0)
    resized = functools.partial(progressive_image_size, full_size=32, start_size=16, full_size_at=0.5)
    # 4 epochs, a ramp of 2: 16 px, then 24 px (the ramp's share of 16, 20, 24, 28), then 32 twice.
    assert planned_seconds(4, RATES, images_per_epoch=1000, image_side=resized) == pytest.approx(
        1.0 + 1.5 + 2.0 + 2.0 + 4 * 10.0)


def test_the_budget_trains_the_most_epochs_that_fit_and_no_more_than_the_cap():
    # 12 s an epoch with its validation: 66 s hold 5 of them.
    assert epochs_within(1.1, RATES, fewest=1, most=30, **FULL_SIZE_ONLY) == 5
    assert epochs_within(1.1, RATES, fewest=1, most=3, **FULL_SIZE_ONLY) == 3
    assert epochs_within(0.25, RATES, fewest=1, most=30, **FULL_SIZE_ONLY) == 1


def test_a_budget_too_small_for_the_schedule_says_what_it_would_need():
    with pytest.raises(ValueError) as raised:
        epochs_within(0.3, RATES, fewest=2, most=30, **FULL_SIZE_ONLY)
    message = str(raised.value)
    assert "train.minutes 0.3 fits no run" in message
    assert "the fewest epochs the schedule allows (2) would train for 0.4 min" in message
    assert "16 px 1000 img/s" in message and "32 px 500 img/s" in message
    assert "give train.minutes 0.4 or more" in message


def test_the_first_epochs_time_scales_every_sides_rate_and_the_validation_alike():
    # The 16 px epoch trained 25% faster than its step was measured: so does every side.
    calibrated = RATES.calibrated(16, 0.00075)
    assert calibrated.seconds_per_image == pytest.approx({16: 0.00075, 20: 0.001125, 24: 0.001125, 28: 0.001125,
                                                          32: 0.0015})
    assert calibrated.validation_seconds == pytest.approx(7.5)
    # 9 s an epoch with its validation instead of 12: 66 s now hold 7 of them.
    assert fitting_epochs(1.1, calibrated, range(1, 31), **FULL_SIZE_ONLY) == list(range(1, 8))
    assert fitting_epochs(1.1, calibrated, [2, 9, 5], **FULL_SIZE_ONLY) == [2, 5]


def test_a_count_replaces_the_planned_one_only_where_its_first_epoch_trains_alike():
    """After the first epoch a budget may change the count only to one whose run would have
    trained that epoch, and set the next step's learning rate, exactly so: a run of the new
    count from scratch (train.epochs=N) is then the same run."""
    ramp = functools.partial(progressive_image_size, full_size=32, start_size=12, full_size_at=0.7)

    def alike(planned: int, counts: range, validate_every: int = 3, **schedule) -> list[int]:
        factors = {count: schedule_factor(dict(name="onecycle", milestones=[], gamma=0.1) | schedule, count, 10)
                   for count in {*counts, planned}}
        return [count for count in counts if trains_alike(
            planned, count, epochs_done=1, steps_per_epoch=10, image_side=ramp, validate_every=validate_every,
            lr_factor=lambda step, total: factors[total](step))]

    # A warm-up over the whole first epoch: its steps and the next rise to the peak alike for any count.
    assert alike(20, range(2, 35), warmup_epochs=1.0) == list(range(2, 35))
    # A shorter warm-up (or none): the decay starts within the first epoch, at a slope each count sets.
    assert alike(20, range(2, 35), warmup_epochs=0.5) == [20]
    assert alike(20, range(2, 35), warmup_epochs=0.0) == [20]
    # One epoch is its own last, so it is validated where the others are not.
    assert alike(20, range(1, 4), warmup_epochs=1.0) == [2, 3]
    assert alike(20, range(1, 4), warmup_epochs=1.0, validate_every=1) == [1, 2, 3]


def test_the_sides_to_measure_are_every_side_any_allowed_count_trains_at():
    resized = functools.partial(progressive_image_size, full_size=32, start_size=12, full_size_at=0.7)
    assert image_sides(resized, 1, 34) == [12, 16, 20, 24, 28, 32]
    # Two epochs have a ramp of one: 12 px, then 32.
    assert image_sides(resized, 2, 2) == [12, 32]
    assert image_sides(lambda epoch, epochs: 32, 1, 10) == [32]


def test_measuring_leaves_the_weights_statistics_and_random_state_as_they_were():
    """Training from a measured model must be training from scratch: the same weights, batch
    norm statistics and torch random state as a model that was never measured, so a run with a
    budget trains what `train.epochs=N` trains."""
    torch.manual_seed(0)
    model = create_model("attention56_tiny")
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(96) % 10
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    random_state = torch.get_rng_state()

    def throwaway():
        optimizer = build_optimizer(model, "sgd", 0.5)
        return optimizer, build_scheduler(optimizer, total_steps=100, schedule="constant")

    rates = measure_rates(model, throwaway, images, labels, images[:40], labels[:40], NORM, sides=[16, 32],
                          batch_size=16, eval_batch_size=20, steps=3, ema_decay=0.9, label_smoothing=0.1)
    assert sorted(rates.seconds_per_image) == [16, 32]
    assert all(seconds > 0 for seconds in rates.seconds_per_image.values())
    assert rates.validation_seconds > 0
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # running stats and counts included
    assert torch.equal(torch.get_rng_state(), random_state)
    # And the measured model trains on from there as the unmeasured one does.
    optimizer = build_optimizer(model, "sgd", 0.05)
    result = train_epoch(model, optimizer, build_scheduler(optimizer, total_steps=6, schedule="constant"), images,
                         labels, NORM, batch_size=16, seed=0, epoch=0)
    torch.manual_seed(0)
    fresh = create_model("attention56_tiny")
    optimizer = build_optimizer(fresh, "sgd", 0.05)
    expected = train_epoch(fresh, optimizer, build_scheduler(optimizer, total_steps=6, schedule="constant"), images,
                           labels, NORM, batch_size=16, seed=0, epoch=0)
    assert result.loss == expected.loss
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
