"""params.yaml validation: every mistake is one clear message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params, parse_params
from pipeline.train import check_resources

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def base() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def test_the_shipped_params_and_every_profile_validate():
    for profile in base()["profiles"]:
        params = load_params(PARAMS, overrides={"profile": profile})
        assert params.profile == profile
    assert load_params(PARAMS, overrides={"profile": "paper"}).model.preset == "attention92"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model": {"preset": "attention93"}}, "unknown model preset 'attention93'; choose one of: attention56"),
        ({"model": {"overrides": {"r": 0}}}, "r (units between adjacent pooling layers"),
        ({"train": {"optimizer": {"lr": -0.1}}}, "train.optimizer.lr: Input should be greater than 0 (got -0.1)"),
        ({"train": {"schedule": {"name": "cosin"}}}, "train.schedule.name: Input should be 'step', 'cosine', 'onecycle' or 'constant'"),
        ({"train": {"epochs": "ten"}}, "train.epochs: Input should be a valid integer"),
        ({"train": {"lerning_rate": 0.1}}, "train.lerning_rate: unknown key (a typo?)"),
        ({"train": {"batch_size": 127}}, "batch_size 127 does not split evenly over num_workers 2"),
        ({"data": {"source": ""}}, "data.source: String should have at least 1 character"),
        ({"profile": "papper"}, "profile: unknown profile 'papper'; defined: quick-cpu, fast, paper, seed-report"),
    ],
)
def test_bad_params_fail_with_one_message_naming_the_key(change, expected):
    raw = base()
    for section, value in change.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, dict) and isinstance(raw[section].get(key), dict):
                    raw[section][key] = raw[section][key] | inner
                else:
                    raw[section][key] = inner
        else:
            raw[section] = value
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert expected in str(error.value)


def test_requests_this_machine_cannot_meet_fail_before_ray_starts():
    raw = base()
    raw["train"]["num_workers"] = 64
    raw["train"]["batch_size"] = 128
    with pytest.raises(ConfigError, match="train.num_workers 64 exceeds the .* CPU"):
        check_resources(parse_params(raw))
    raw = base()
    raw["train"]["use_gpu"] = True
    with pytest.raises(ConfigError, match="train.use_gpu is true but no CUDA GPU is visible"):
        check_resources(parse_params(raw))


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_every_section_has_valid_defaults():
    params = parse_params({})
    assert params.train.schedule.name == "cosine" and params.model.preset == "attention56_narrow"
