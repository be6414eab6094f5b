"""Behaviour of the Residual Attention Network that users and the pipeline rely on."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from resattn import PRESETS, create_model, list_presets, model_config
from resattn.model import AttentionModule, ResidualUnit, SoftMaskBranch
from resattn.model_file import load_model, save_model
from resattn.data import Normalization
from resattn.training import evaluate, translated_views
from resattn.summary import count_macs, count_parameters, count_training_flops, main as summary_main


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_gives_logits_in_train_and_eval(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = images(2)
    model.train()
    assert model(x).shape == (2, 7)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["attention92", "attention236", "attention452"])
def test_parameter_counts_match_the_paper_within_ten_percent(name):
    paper = PRESETS[name].paper_params_millions * 1e6
    params = count_parameters(create_model(name))
    assert abs(params - paper) / paper < 0.10, f"{name}: {params / 1e6:.2f}M vs paper {paper / 1e6:.1f}M"


def test_depth_follows_36m_plus_20():
    for name, m in [("attention56", 1), ("attention92", 2), ("attention128", 3), ("attention164", 4), ("attention236", 6)]:
        assert model_config(name).depth == 36 * m + 20
    assert model_config("attention452").depth == 452


# Untrained BN running statistics are the identity, so an untrained net in eval mode does not
# normalise and its mask logits saturate; train mode shows the masks as a trained net makes them.


def test_mixed_masks_lie_strictly_between_zero_and_one_with_the_trunk_shape():
    torch.manual_seed(0)
    model = create_model("attention56_tiny", modules_per_stage=(1, 2, 1)).train()
    masks = model.attention_masks(images(3))
    assert list(masks) == [name for name, _ in model.attention_modules()]
    assert len(masks) == 4
    widths = model.config.stage_widths
    expected_shapes = [(3, widths[0], 32, 32), (3, widths[1], 16, 16), (3, widths[1], 16, 16), (3, widths[2], 8, 8)]
    for mask, shape in zip(masks.values(), expected_shapes):
        assert mask.shape == shape
        assert (mask > 0).all() and (mask < 1).all()


def test_attention_masks_leave_no_hooks_behind():
    model = create_model("attention56_tiny").eval()
    model.attention_masks(images(1))
    for module in model.modules():
        assert not module._forward_hooks


def test_each_mask_bottoms_out_at_four_by_four():
    model = create_model("attention56_tiny")
    seen = {}
    hooks = [
        branch.down[-1].register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.shape[-2:]))
        for name, branch in model.named_modules()
        if isinstance(branch, SoftMaskBranch)
    ]
    model(images(1))
    for hook in hooks:
        hook.remove()
    assert len(seen) == 3 and all(tuple(size) == (4, 4) for size in seen.values())


def test_other_mask_activations():
    torch.manual_seed(0)
    x = images(2)
    spatial = create_model("attention56_tiny", mask_activation="spatial").train()
    for mask in spatial.attention_masks(x).values():
        assert (mask > 0).all() and (mask < 1).all()
    channel = create_model("attention56_tiny", mask_activation="channel").train()
    for mask in channel.attention_masks(x).values():
        norms = mask.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def _first_attention_module(model) -> AttentionModule:
    return next(module for _, module in model.attention_modules())


def test_with_a_zero_mask_a_residual_attention_module_is_its_trunk_path(monkeypatch):
    torch.manual_seed(0)
    module = _first_attention_module(create_model("attention56_tiny").eval())
    x = torch.randn(2, module.trunk[0].bn1.num_features, 32, 32)
    monkeypatch.setattr(module.mask, "forward", lambda inp: torch.zeros_like(inp))
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.post(module.trunk(module.pre(x))))


def test_naive_attention_learning_changes_the_output():
    torch.manual_seed(0)
    residual = create_model("attention56_tiny").eval()
    naive = create_model("attention56_tiny", attention="naive").eval()
    naive.load_state_dict(residual.state_dict())
    x = images(2)
    with torch.no_grad():
        assert not torch.allclose(residual(x), naive(x), atol=1e-4)
        # Same weights, so the only difference is the merge: M*T versus (1+M)*T.
        module_r, module_n = _first_attention_module(residual), _first_attention_module(naive)
        features = torch.randn(2, module_r.trunk[0].bn1.num_features, 32, 32)
        pre = module_r.pre(features)
        trunk, mask = module_r.trunk(pre), module_r.mask(pre)
        torch.testing.assert_close(module_n(features), module_n.post(mask * trunk))
        torch.testing.assert_close(module_r(features), module_r.post((1 + mask) * trunk))


def test_channels_last_matches_eager_within_tolerance():
    torch.manual_seed(0)
    model = create_model("attention56_tiny").eval()
    x = images(4)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        fast = model_cl(x.contiguous(memory_format=torch.channels_last))
    # fp32 with a different reduction order. The untrained logits span hundreds, so a logit near
    # zero carries the rounding of the large ones: the tolerance scales with their size. On an
    # AVX2 CPU the kernels differ by up to 4e-7 of it (AVX-512 by less); a wrong layout would
    # differ by the whole of it.
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_bf16_autocast_matches_fp32_within_bf16_precision():
    torch.manual_seed(0)
    model = create_model("attention56_tiny").train()  # batch statistics: the training path
    x = images(16)
    with torch.no_grad():
        reference = model(x).softmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x).float().softmax(1)
    # bf16 keeps 8 significant bits (0.4% per op); after 56 layers the class probabilities
    # still agree within 0.01 (0.0033 measured).
    torch.testing.assert_close(fast, reference, atol=0.01, rtol=0)


def test_flip_tta_averages_each_image_with_its_mirror_and_reports_the_single_view_too():
    torch.manual_seed(0)
    model = create_model("attention56_tiny").eval()
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12) % 10
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    plain = evaluate(model, x, labels, norm, batch_size=5)
    tta = evaluate(model, x, labels, norm, batch_size=5, flip_tta=True)
    mirrored = evaluate(model, x.flip(3), labels, norm, batch_size=5)
    torch.testing.assert_close(tta.probabilities, (plain.probabilities + mirrored.probabilities) / 2)
    assert tta.single_view_accuracy == plain.single_view_accuracy == plain.accuracy
    assert tta.accuracy == (tta.probabilities.argmax(1) == labels).double().mean().item()


def test_translate_tta_gives_the_flip_average_and_the_moved_views_equal_weight():
    torch.manual_seed(0)
    model = create_model("attention56_tiny").eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6)
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    down, up = translated_views(x)
    assert torch.equal(down[:, :, 1:, 1:], x[:, :, :-1, :-1]) and torch.equal(up[:, :, :-1, :-1], x[:, :, 1:, 1:])
    assert torch.equal(down[:, :, 0], down[:, :, 2])  # the edge is mirrored in, not zeros
    flip = [evaluate(model, view, labels, norm, flip_tta=True).probabilities for view in (x, down, up)]
    both = evaluate(model, x, labels, norm, flip_tta=True, translate_tta=True)
    torch.testing.assert_close(both.probabilities, flip[0] / 2 + (flip[1] + flip[2]) / 4)
    assert both.single_view_accuracy == evaluate(model, x, labels, norm).accuracy


@pytest.mark.slow
def test_torch_compile_matches_eager_within_tolerance():
    torch.manual_seed(0)
    model = create_model("attention56_tiny", modules_per_stage=(1, 0, 0))
    x = images(4)
    compiled = torch.compile(model)
    for mode in (model.train, model.eval):
        mode()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_parameter_including_the_mask_branch():
    torch.manual_seed(0)
    model = create_model("attention56_tiny")
    loss = nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert any(".mask." in name for name, _ in model.named_parameters())


def test_zero_init_residual_starts_every_unit_as_the_identity_and_still_learns():
    torch.manual_seed(0)
    model = create_model("attention56_tiny", zero_init_residual=True)
    unit = model.stages.stage1.attention1.trunk[0]
    x = torch.randn(2, unit.bn1.num_features, 8, 8)
    torch.testing.assert_close(unit(x), x)
    nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    for module in model.modules():
        if isinstance(module, ResidualUnit):
            assert module.conv3.weight.grad.abs().sum() > 0


def test_he_initialisation_and_unit_batchnorm():
    model = create_model("attention56")
    conv = model.stages.stage2.attention1.trunk[0].conv2
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert (module.weight == 1).all() and (module.bias == 0).all()


def test_a_tiny_model_fits_64_fixed_images():
    torch.manual_seed(0)
    model = create_model("attention56_tiny")
    x = images(64, seed=1)
    y = torch.arange(64) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        logits = model(x)
        accuracy = (logits.argmax(1) == y).float().mean().item()
        if accuracy == 1.0:
            break
        optimizer.zero_grad()
        nn.functional.cross_entropy(logits, y).backward()
        optimizer.step()
    assert accuracy == 1.0, f"training accuracy {accuracy:.2%} after {step} steps"


def test_same_seed_gives_the_same_initial_weights():
    torch.manual_seed(123)
    first = create_model("attention56_tiny").state_dict()
    torch.manual_seed(123)
    second = create_model("attention56_tiny").state_dict()
    torch.manual_seed(124)
    third = create_model("attention56_tiny").state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("attention56", {"p": -1}, "p (pre- and post-processing units"),
        ("attention56", {"t": 0}, "t (units in the trunk branch) must be an integer >= 1; got 0"),
        ("attention56", {"r": 0}, "r (units between adjacent pooling layers"),
        ("attention56", {"r": 1.5}, "got 1.5"),
        ("attention56", {"modules_per_stage": []}, "exactly 3 integers"),
        ("attention56", {"modules_per_stage": (1, -1, 1)}, "must be >= 0 in every stage"),
        ("attention56", {"modules_per_stage": (0, 0, 0)}, "at least one attention module"),
        ("attention56", {"modules_per_stage": "111"}, "modules_per_stage must be a list"),
        ("attention56", {"width_multiplier": 0.3}, "each must be a positive multiple of 4"),
        ("attention56", {"width_multiplier": -1.0}, "width_multiplier must be a positive number"),
        ("attention56", {"mask_activation": "softmax"}, "choose one of: mixed, channel, spatial"),
        ("attention56", {"attention": "gated"}, "choose one of: residual, naive"),
        ("attention56", {"num_classes": 0}, "num_classes"),
        ("attention56", {"depth": 92}, "unknown model override(s) depth; valid ones: modules_per_stage"),
        ("attention93", {}, "unknown model preset 'attention93'; choose one of: attention56, attention92"),
    ],
)
def test_invalid_configs_raise_one_clear_value_error(preset, overrides, message):
    with pytest.raises(ValueError) as error:
        create_model(preset, **overrides)
    assert message in str(error.value)


def test_too_small_or_wrong_inputs_are_refused_clearly():
    model = create_model("attention56_tiny")
    with pytest.raises(ValueError, match=r"too small.*at least 8x8"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\); got shape \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32))


def test_larger_inputs_work():
    model = create_model("attention56_tiny").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 48)).shape == (1, 10)


def test_resattn_needs_neither_ray_nor_mlflow_nor_dvc():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Forbid(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"ray", "mlflow", "dvc"}:
                    raise ImportError(f"{name} is forbidden in this test")

        sys.meta_path.insert(0, Forbid())
        import torch
        import resattn
        import resattn.summary
        model = resattn.create_model("attention56_tiny")
        print(model(torch.randn(2, 3, 32, 32)).shape)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 10])" in result.stdout


def test_summary_prints_a_row_per_preset(capsys):
    summary_main(["attention92", "attention56_tiny"])
    out = capsys.readouterr().out
    assert "| `attention92` | 92 | 1,2,1 | 2/2/2 | 16/64/128/256 | 1.96M | 212 | 1.9M | 4.99% |" in out
    assert "`attention56_tiny`" in out


def test_training_flops_are_a_forward_pass_and_a_backward_pass_of_twice_its_cost():
    model = create_model("attention56_tiny")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    forward_flops = 2 * count_macs(model)
    # The backward pass computes each layer's input and weight gradients, except the stem's
    # input gradient (the image needs none): just under three forward passes in all.
    assert 2.9 * forward_flops < count_training_flops(model) < 3 * forward_flops
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# The trained-model file


def test_a_model_file_rebuilds_its_network_from_the_stored_config_not_the_preset(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = create_model("attention56_tiny", r=2, modules_per_stage=(1, 0, 1)).eval()
    path = tmp_path / "model.pt"
    save_model(path, model.state_dict(), model.config, preset="attention56_tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left
    # Editing (or removing) the preset later changes nothing for files already saved.
    monkeypatch.setitem(PRESETS, "attention56_tiny", PRESETS["attention92"])
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images(2)), model(images(2)))


def test_a_model_file_from_before_the_format_loads(tmp_path):
    """Files written before resattn.model_file stored `preset` and `overrides` beside the same
    config fields; they load from that config."""
    model = create_model("attention56_tiny", p=0).eval()
    path = tmp_path / "old.pt"
    torch.save({"model": model.state_dict(), "preset": "attention56_tiny", "overrides": {"p": 0},
                "config": dict(model.config.__dict__)}, path)
    assert load_model(path).config == model.config


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"model": {}, "epoch": 3}, "is not a resattn model file (no weights and config)"),
        ({"model": {}, "config": {"p": 1, "heads": 4}}, "was saved by a newer resattn (config fields ['heads']"),
        (b"not a torch file", "is not a readable model file (UnpicklingError"),
        (None, "no such model file; run the train stage first"),
    ],
)
def test_what_is_not_a_model_file_fails_with_one_message_naming_it(tmp_path, content, expected):
    path = tmp_path / "model.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ValueError) as error:
        load_model(path)
    assert str(error.value).startswith(str(path)) and expected in str(error.value)
