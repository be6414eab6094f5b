"""The training step's guard against divergence, the learning-rate schedules, parameter
groups, the weight average, and resuming from a training state."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

import resattn.training
from resattn import create_model
from resattn.data import Normalization
from resattn.training import (
    GraphedStep,
    NonFiniteLossError,
    autocast_dtype,
    build_optimizer,
    build_scheduler,
    global_maxima,
    global_minima,
    global_sums,
    grad_scaler,
    lr_factor,
    optimizer_and_scheduler,
    parameter_groups,
    precision_name,
    reschedule,
    restore_training_state,
    schedule_factor,
    train_epoch,
    trained_weights,
    validates_after,
    training_model,
    training_state,
    weight_average,
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


def test_an_epoch_with_an_image_size_trains_every_batch_at_that_size_in_the_asked_memory_format():
    torch.manual_seed(0)
    model = create_model("attention56_tiny").to(memory_format=torch.channels_last)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    optimizer = build_optimizer(model, "sgd", 0.01)
    scheduler = build_scheduler(optimizer, total_steps=4, schedule="constant")
    images, labels = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.arange(64) % 10
    train_epoch(model, optimizer, scheduler, images, labels, NORM, batch_size=16, seed=0, epoch=0, image_size=16,
                channels_last=True)
    assert len(seen) == 4
    assert all(x.shape == (16, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last) for x in seen)


def test_validation_follows_every_nth_epoch_and_always_the_last():
    assert [validates_after(epoch, 5) for epoch in range(5)] == [True] * 5  # every epoch by default
    # hour-cpu-fp32: 13 epochs, validated after the 3rd, 6th, 9th, 12th and the last.
    assert [epoch + 1 for epoch in range(13) if validates_after(epoch, 13, 3)] == [3, 6, 9, 12, 13]
    assert [epoch + 1 for epoch in range(3) if validates_after(epoch, 3, 10)] == [3]


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("constant", 50, 1.0), ("step", 59, 1.0), ("step", 60, 0.1), ("step", 90, 0.01),
     ("cosine", 0, 1.0), ("cosine", 50, 0.5), ("onecycle", 0, 0.1), ("onecycle", 9, 1.0), ("onecycle", 55, 0.5)],
)
def test_learning_rate_schedules(schedule, step, expected):
    warmup = 10 if schedule == "onecycle" else 0
    factor = lr_factor(step, 100, schedule, warmup_steps=warmup, milestones=[60, 90], gamma=0.1)
    assert factor == pytest.approx(expected)


def test_weight_decay_spares_norm_and_bias_unless_asked_and_their_lr_may_be_scaled():
    model = create_model("attention56_tiny")
    weights, norm_and_bias = parameter_groups(model, 0.1, 5e-4, decay_norm_and_bias=False)
    assert weights["weight_decay"] == 5e-4 and norm_and_bias["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in norm_and_bias["params"])
    assert len(weights["params"]) + len(norm_and_bias["params"]) == len(list(model.parameters()))
    weights, norm_and_bias = parameter_groups(model, 0.1, 1e-4, decay_norm_and_bias=True)
    assert weights["weight_decay"] == norm_and_bias["weight_decay"] == 1e-4
    optimizer = build_optimizer(model, "sgd", 0.1, norm_and_bias_lr_multiplier=8.0)
    scheduler = build_scheduler(optimizer, total_steps=10, schedule="cosine")
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    weights_lr, norm_and_bias_lr = (group["lr"] for group in optimizer.param_groups)
    assert weights_lr == pytest.approx(0.05) and norm_and_bias_lr == pytest.approx(0.4)  # the schedule scales both


def test_a_recipes_model_has_its_arguments_bn_momentum_and_memory_format_and_the_seeded_weights():
    torch.manual_seed(0)
    model = training_model("attention56_tiny", {"num_classes": 7}, bn_momentum=0.6, channels_last=True)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(layers) > 10 and all(layer.momentum == 0.6 for layer in layers)
    kernels = [p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    torch.manual_seed(0)
    plain = create_model("attention56_tiny", num_classes=7)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_a_schedule_rebuilt_for_another_count_after_its_warm_up_goes_on_as_one_built_for_it():
    """What a time budget's correction after the first epoch relies on (resattn.budget)."""
    schedule = dict(name="onecycle", warmup_epochs=1.0, milestones=[], gamma=0.1)
    settings = dict(name="sgd", lr=0.2, weight_decay=5e-4)

    def rates(epochs: int, rebuilt_for: int | None = None) -> list[float]:
        optimizer, scheduler = optimizer_and_scheduler(torch.nn.Linear(2, 2), settings, schedule, epochs, 5)
        seen = []
        for step in range(5 * (rebuilt_for or epochs)):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
            if step == 4 and rebuilt_for:  # the first epoch's last step
                reschedule(scheduler, schedule_factor(schedule, rebuilt_for, 5))
        return seen

    assert rates(3, rebuilt_for=6) == rates(6)
    assert rates(6, rebuilt_for=3) == rates(3)
    assert rates(3) != rates(6)[:15]


def test_without_a_process_group_the_global_sums_and_extremes_are_the_values():
    cpu = torch.device("cpu")
    assert global_sums(1.5, 2.0, device=cpu) == global_maxima(1.5, 2.0, device=cpu) == [1.5, 2.0]
    assert global_minima(3.0, device=cpu) == [3.0]


def _setup():
    torch.manual_seed(0)
    model = create_model("attention56_tiny")
    optimizer = build_optimizer(model, "sgd", 0.05)
    scheduler = build_scheduler(optimizer, total_steps=8, schedule="onecycle", warmup_steps=2)
    return model, optimizer, scheduler


def _setup_capturable(device: str = "cpu"):
    """_setup's model, schedule and SGD, its learning rates held in tensors (a CUDA graph's)."""
    torch.manual_seed(0)
    model = create_model("attention56_tiny").to(device)
    optimizer = build_optimizer(model, "sgd", 0.05, capturable=True)
    scheduler = build_scheduler(optimizer, total_steps=8, schedule="onecycle", warmup_steps=2)
    return model, optimizer, scheduler


def test_a_capturable_sgd_steps_as_the_plain_one_with_rates_the_schedule_writes_in_place():
    """What a CUDA graph's optimizer step relies on: each group's learning rate stays one tensor,
    which the schedule overwrites every step, and the fused step updates as the plain one does.
    The rates are float32 (the CUDA kernel reads them so), 1e-8 off the plain path's doubles:
    enough to flip a tie in a max-pool later on, so the updates are compared over one step."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    plain, capturable = _setup(), _setup_capturable()
    held = [group["lr"] for group in capturable[1].param_groups]
    assert all(isinstance(rate, torch.Tensor) and rate.dtype == torch.float32 for rate in held)
    rates = {"plain": [], "capturable": []}
    plain[1].register_step_pre_hook(lambda optimizer, *_: rates["plain"].append(optimizer.param_groups[1]["lr"]))
    capturable[1].register_step_pre_hook(lambda optimizer, *_: rates["capturable"].append(float(held[1])))

    one_step = {"batch_size": 16, "seed": 0, "epoch": 0}
    expected = train_epoch(*plain, images[:16], labels[:16], NORM, **one_step)
    result = train_epoch(*capturable, images[:16], labels[:16], NORM, **one_step)
    assert result.loss == expected.loss
    for a, b in zip(plain[0].parameters(), capturable[0].parameters()):
        assert torch.allclose(a, b, atol=1e-7)
    for epoch in range(2):
        for objects in (plain, capturable):
            train_epoch(*objects, images, labels, NORM, batch_size=16, seed=0, epoch=epoch)
    assert all(group["lr"] is rate for group, rate in zip(capturable[1].param_groups, held))
    assert rates["capturable"] == pytest.approx(rates["plain"], rel=1e-6) and len(rates["plain"]) == 9
    assert float(held[0]) == pytest.approx(0.05 * lr_factor(9, 8, "onecycle", warmup_steps=2), abs=1e-9)

    state = training_state(*capturable, epoch=1, history=[])
    resumed = _setup_capturable()
    kept = [group["lr"] for group in resumed[1].param_groups]
    restore_training_state(state, *resumed)
    # The same tensors, now holding the checkpoint's rates: a graph captured after this reads them.
    assert all(group["lr"] is rate for group, rate in zip(resumed[1].param_groups, kept))
    assert [float(rate) for rate in kept] == [float(rate) for rate in held]


def test_a_cuda_graphed_step_refuses_what_it_cannot_capture():
    model, optimizer, _ = _setup_capturable()
    with pytest.raises(ValueError, match="needs the model on a CUDA device, not cpu"):
        GraphedStep(model, optimizer)
    with pytest.raises(ValueError, match="supports the sgd optimizer only, not 'adam'"):
        build_optimizer(model, "adam", 0.1, capturable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (the device check runs this)")
def test_each_cuda_graphed_step_updates_as_the_eager_step_from_the_same_state():
    """Eight steps, each from the eager run's state copied in place into the graphed run's
    tensors (whose addresses the graph holds): three eager warm-up steps, the capture, replays.
    Step by step, so that cuDNN's nondeterministic sums cannot flip a max-pool's tie later on."""
    torch.manual_seed(1)
    batches = [(torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda"))
               for _ in range(8)]
    eager, captured = _setup_capturable("cuda"), _setup_capturable("cuda")
    graphed = GraphedStep(captured[0], captured[1], label_smoothing=0.1)
    for step, (x, y) in enumerate(batches):
        with torch.no_grad():
            for mine, theirs in zip(captured[0].state_dict().values(), eager[0].state_dict().values()):
                mine.copy_(theirs)
            for mine, theirs in zip(captured[0].parameters(), eager[0].parameters()):
                if "momentum_buffer" in eager[1].state[theirs]:
                    captured[1].state[mine]["momentum_buffer"].copy_(eager[1].state[theirs]["momentum_buffer"])
        _, loss = graphed(x, y)
        eager[1].zero_grad(set_to_none=True)
        expected = torch.nn.functional.cross_entropy(eager[0](x), y, label_smoothing=0.1)
        expected.backward()
        eager[1].step()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), step
        for mine, theirs in zip(captured[0].parameters(), eager[0].parameters()):
            assert torch.allclose(mine, theirs, atol=1e-5), step
        eager[2].step()
        captured[2].step()
    assert len(graphed.graphs) == 1 and graphed.eager_steps == {next(iter(graphed.graphs)): GraphedStep.WARMUP_STEPS}


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


def test_mixed_precision_is_bf16_on_a_cpu_that_has_it_and_fp32_otherwise(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(resattn.training, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(cpu, True) == torch.bfloat16 and autocast_dtype(cpu, False) is None
    assert not grad_scaler(cpu, torch.bfloat16).is_enabled()  # bf16 needs no loss scaling
    # An AVX2-only CPU would emulate bf16, 6x slower than fp32: mixed precision means fp32 there.
    monkeypatch.setattr(resattn.training, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype(cpu, True) is None
    # The worker's first line and the benchmarks' reports name the arithmetic the same way.
    assert [precision_name(autocast_dtype(cpu, True)), precision_name(torch.bfloat16)] == ["float32", "bfloat16"]


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="reads x86 Linux CPU flags")
def test_the_bf16_check_matches_this_cpus_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert resattn.training.cpu_has_native_bf16() == bool({"avx512bw", "amx_bf16"} & flags)


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


def test_the_weight_average_follows_every_step_bn_statistics_included_and_is_what_is_kept():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    model, optimizer, scheduler = _setup()
    average = weight_average(model, 0.9)
    snapshots = []  # the weights and BN statistics right after each update, as the average sees them
    optimizer.register_step_post_hook(lambda *_: snapshots.append(
        {key: value.clone().double() for key, value in model.state_dict().items()}))
    train_epoch(model, optimizer, scheduler, images, labels, NORM, batch_size=16, seed=0, epoch=0, average=average)
    assert len(snapshots) == 4 and int(average.n_averaged) == 4
    expected = snapshots[0]  # the first update copies; each later one moves 10% of the way
    for snapshot in snapshots[1:]:
        expected = {key: 0.9 * expected[key] + 0.1 * snapshot[key] for key in expected}
    kept = trained_weights(training_state(model, optimizer, scheduler, 0, [], average=average))
    assert kept.keys() == model.state_dict().keys()
    first_bn = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_conv = next(name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    for key in (f"{first_conv}.weight", f"{first_bn}.weight", f"{first_bn}.running_mean", f"{first_bn}.running_var"):
        assert torch.allclose(kept[key].double(), expected[key], atol=1e-6), key
        assert not torch.allclose(kept[key].double(), snapshots[-1][key], atol=1e-6), key  # not the weights
    fresh = create_model("attention56_tiny")
    fresh.load_state_dict(kept)  # a model file of these weights rebuilds the model


def test_a_restored_weight_average_continues_exactly_as_an_uninterrupted_run():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10

    def epoch(objects, average, number):
        return train_epoch(*objects, images, labels, NORM, batch_size=16, seed=0, epoch=number, average=average)

    straight = _setup()
    straight_average = weight_average(straight[0], 0.8)
    for number in (0, 1):
        epoch(straight, straight_average, number)
    first = _setup()
    first_average = weight_average(first[0], 0.8)
    epoch(first, first_average, 0)
    state = training_state(*first, epoch=0, history=[], average=first_average)
    resumed = _setup()
    resumed_average = weight_average(resumed[0], 0.8)
    restore_training_state(state, *resumed, average=resumed_average)
    epoch(resumed, resumed_average, 1)
    for a, b in zip(straight_average.state_dict().values(), resumed_average.state_dict().values()):
        assert torch.equal(a, b)


def test_without_a_weight_average_the_weights_themselves_are_kept():
    model, optimizer, scheduler = _setup()
    assert weight_average(model, 0.0) is None
    state = training_state(model, optimizer, scheduler, 0, [])
    assert trained_weights(state) is state["model"]
