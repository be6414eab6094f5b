"""params.yaml validation: every mistake is one clear message naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, compose, load_params, parse_params, render
from pipeline.cluster import check_resources, resource_problem
from pipeline.search import concurrent_trials, trial_raw
from helpers import ROOT, run, shipped_params

PARAMS = ROOT / "params.yaml"
PROFILES = sorted(path.stem for path in (PARAMS.parent / "conf" / "profile").glob("*.yaml"))


def test_the_shipped_params_and_every_profile_validate():
    assert PROFILES == ["a92-gpu", "fast", "hour-cpu", "hour-cpu-a56", "hour-cpu-fp32", "paper", "quick-cpu", "seed-report"]
    for profile in PROFILES:
        assert load_params(PARAMS, [f"profile={profile}"]).profile == profile
    assert load_params(PARAMS, ["profile=paper"]).model.preset == "attention92"
    assert load_params(PARAMS).profile == "quick-cpu"


def test_params_yaml_is_what_dvc_composes_from_conf():
    """`dvc repro` runs what `dvc exp run` would compose: DVC's own Hydra composition, byte for
    byte, with Hydra enabled in the committed DVC config."""
    from dvc.utils.hydra import compose_and_dump

    composed = PARAMS.parent / ".pytest-composed-params.yaml"
    try:
        compose_and_dump(composed, str(PARAMS.parent / "conf"), None, "config", str(PARAMS.parent), [])
        assert PARAMS.read_text() == composed.read_text() == render(compose(params_path=PARAMS))
    finally:
        composed.unlink(missing_ok=True)
    enabled = subprocess.run(["dvc", "config", "hydra.enabled"], cwd=PARAMS.parent, capture_output=True, text=True,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert enabled.stdout.strip() == "true", enabled.stderr


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
        # An elastic group keeps the global batch for any count in its range.
        ({"train": {"num_workers": [2, 4], "batch_size": 16}},
         "batch_size 16 does not split evenly over num_workers 2 to 4; use a multiple of 12"),
        ({"train": {"num_workers": [3, 1]}}, "num_workers [3, 1] must be at least 1, and fewest <= most"),
        ({"train": {"num_workers": [1, 2, 3]}}, "num_workers [1, 2, 3] must be a count or [fewest, most]"),
        ({"train": {"num_workers": 0}}, "num_workers 0 must be at least 1"),
        ({"train": {"sync_batchnorm": True}}, "sync_batchnorm needs use_gpu: true (torch synchronises batch norm on GPUs"),
        ({"train": {"gpus_per_worker": 0.5}}, "gpus_per_worker 0.5 needs use_gpu: true"),
        ({"train": {"cuda_graphs": True}}, "cuda_graphs needs use_gpu: true, num_workers 1: the graph holds one GPU's"),
        ({"train": {"cuda_graphs": True, "use_gpu": True, "num_workers": 1, "compile": True,
                    "optimizer": {"name": "adam"}}}, "cuda_graphs needs compile: false, optimizer.name sgd: "),
        ({"train": {"use_gpu": True, "gpus_per_worker": 0.5}}, "gpus_per_worker 0.5 needs num_workers 1: the workers"),
        ({"train": {"gpus_per_worker": 2.0}}, "train.gpus_per_worker: Input should be less than or equal to 1"),
        ({"data": {"source": ""}}, "data.source: String should have at least 1 character"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay: Input should be less than 1 (got 1.0)"),
        ({"train": {"minutes": 0}}, "train.minutes: Input should be greater than 0 (got 0)"),
        ({"train": {"bn_momentum": 0.0}}, "train.bn_momentum: Input should be greater than 0 (got 0.0)"),
        ({"train": {"progressive_resizing": {"start_size": 4}}},
         "train.progressive_resizing.start_size 4 is below 8, the smallest image attention56_narrow's masks can pool; "
         "use 0 (off) or 8 to 32"),
        ({"train": {"progressive_resizing": {"start_size": 40}}},
         "train.progressive_resizing.start_size: Input should be less than or equal to 32 (got 40)"),
    ],
)
def test_bad_params_fail_with_one_message_naming_the_key(change, expected):
    raw = shipped_params()
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
    raw = shipped_params()
    raw["train"]["num_workers"] = 64
    raw["train"]["batch_size"] = 128
    with pytest.raises(ConfigError, match="train.num_workers 64 exceeds the .* CPU"):
        check_resources(parse_params(raw), "sqlite:///mlflow.db")
    raw = shipped_params()
    raw["train"]["use_gpu"] = True
    with pytest.raises(ConfigError, match="train.use_gpu is true but no CUDA GPU is visible"):
        check_resources(parse_params(raw), "sqlite:///mlflow.db")


CLUSTER = "10.0.0.1:6379"


@pytest.mark.parametrize(
    ("train", "ray", "tracking_uri", "nodes", "capacity", "expected"),
    [
        # One node: its own disk is shared storage enough.
        ({}, {}, "sqlite:////p/mlflow.db", 1, {"CPU": 4}, None),
        ({}, {}, "http://mlflow:5000", 3, {"CPU": 4},
         "ray.storage_path 'ray_results' is a folder on each node, but the cluster at 10.0.0.1:6379 has 3 nodes"),
        ({}, {"storage_path": "file:///shared/runs"}, "http://mlflow:5000", 3, {"CPU": 4}, "is a folder on each node"),
        ({}, {"storage_path": "s3://b/runs"}, "sqlite:////p/mlflow.db", 3, {"CPU": 4},
         "mlflow.tracking_uri sqlite:////p/mlflow.db is a database on each node, but the cluster at 10.0.0.1:6379 has 3"),
        ({}, {"storage_path": "s3://b/runs"}, "http://mlflow:5000", 3, {"CPU": 4}, None),
        ({}, {"storage_path": "gs://b/runs"}, "postgresql://u:secret@db/mlflow", 3, {"CPU": 4}, None),
        ({"num_workers": 4, "batch_size": 128}, {}, "sqlite:////p/mlflow.db", 1, {"CPU": 2},
         "train.num_workers 4 exceeds the 2 CPU(s) of the cluster at 10.0.0.1:6379; use at most 2"),
        # An elastic group starts with its fewest workers and grows as the cluster does.
        ({"num_workers": [2, 4], "batch_size": 120}, {}, "sqlite:////p/mlflow.db", 1, {"CPU": 2}, None),
        ({"num_workers": [3, 4], "batch_size": 12}, {}, "sqlite:////p/mlflow.db", 1, {"CPU": 2},
         "train.num_workers 3 to 4 exceeds the 2 CPU(s) of the cluster at 10.0.0.1:6379; use at most 2"),
        # GPUs are counted on the cluster (an autoscaler's included), never on the driver's machine.
        ({"use_gpu": True, "num_workers": 8, "batch_size": 128}, {}, "sqlite:////p/mlflow.db", 1,
         {"CPU": 2, "GPU": 8}, None),
        ({"use_gpu": True}, {}, "sqlite:////p/mlflow.db", 1, {"CPU": 64},
         "train.use_gpu is true but the cluster at 10.0.0.1:6379 has no GPU and cannot add one"),
    ],
)
def test_a_cluster_refuses_in_one_line_what_it_cannot_run(train, ray, tracking_uri, nodes, capacity, expected):
    raw = shipped_params()
    raw["train"] |= train
    raw["ray"] |= ray
    problem = resource_problem(parse_params(raw), tracking_uri, cluster=CLUSTER, nodes=nodes, capacity=capacity)
    assert problem == expected if expected is None else expected in problem


@pytest.mark.parametrize(
    ("train", "tune", "capacity", "expected"),
    [
        ({}, {"workers_per_trial": 1}, {"CPU": 8}, 8),
        ({}, {"workers_per_trial": 2}, {"CPU": 5}, 2),
        # The capacity includes what an autoscaler may add: a cluster at zero GPUs still fans out.
        ({"use_gpu": True}, {}, {"CPU": 32, "GPU": 4}, 4),
        ({"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.25}, {}, {"CPU": 32, "GPU": 4}, 16),
        ({"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.25}, {}, {"CPU": 6, "GPU": 4}, 6),  # a CPU each
        ({"use_gpu": True}, {}, {"CPU": 8}, 1),
    ],
)
def test_a_sweep_runs_as_many_trials_at_once_as_the_cluster_fits(train, tune, capacity, expected):
    raw = shipped_params()
    raw["train"] |= train
    raw["tune"] |= tune
    assert concurrent_trials(parse_params(raw), capacity) == expected


def test_a_tracking_password_stays_out_of_the_cluster_check():
    raw = shipped_params()
    raw["ray"]["storage_path"] = "s3://b/runs"
    problem = resource_problem(parse_params(raw), "file://alice:secret@host/p/mlruns", cluster=CLUSTER, nodes=2,
                               capacity={"CPU": 4})
    assert "mlflow.tracking_uri file://host/p/mlruns is a database on each node" in problem and "secret" not in problem


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("schedule, fewest", [({"name": "onecycle", "warmup_epochs": 1.0}, 2),
                                               ({"name": "onecycle", "warmup_epochs": 0.5}, 1),
                                               ({"name": "step", "milestones": [3, 4.5]}, 5),
                                               ({"name": "cosine"}, 1)])
def test_a_time_budget_chooses_no_fewer_epochs_than_the_schedule_runs_through(schedule, fewest):
    """Past the warm-up and the last milestone: a count the epochs setting itself would refuse."""
    train = parse_params({"train": {"epochs": 10, "minutes": 5.0, "schedule": schedule}}).train
    assert train.fewest_epochs == fewest


def test_every_section_has_valid_defaults():
    params = parse_params({})
    assert params.train.schedule.name == "cosine" and params.model.preset == "attention56_narrow"


# --------------------------------------------------------------------------------------------
# One order of precedence: built-in defaults < conf/config.yaml < profile < -S < a sweep's values


def test_explicit_overrides_beat_the_profile_and_the_profile_beats_conf():
    assert shipped_params()["train"]["epochs"] == 5
    assert load_params(PARAMS, ["profile=fast"]).train.epochs == 24
    assert load_params(PARAMS, ["profile=fast", "train.epochs=30"]).train.epochs == 30
    assert load_params(PARAMS, ["train.epochs=30", "profile=fast"]).train.epochs == 30  # in any order
    assert load_params(PARAMS, ["profile=paper", "train.optimizer.lr=0.05"]).train.optimizer.lr == 0.05
    assert parse_params({}).train.epochs == 10  # built-in defaults fill what nothing sets


def test_a_profile_or_key_that_does_not_exist_fails_with_what_exists():
    with pytest.raises(ConfigError) as error:
        load_params(PARAMS, ["profile=papper"])
    assert "Could not find 'profile/papper'" in str(error.value)
    assert all(name in str(error.value) for name in PROFILES)
    with pytest.raises(ConfigError, match=r"Could not override 'train.epochz'.\nTo append to your config use "
                                          r"\+train.epochz=3"):
        load_params(PARAMS, ["train.epochz=3"])


def test_a_sweep_trial_keeps_its_sampled_values_and_budget_under_any_profile():
    raw = compose(["profile=paper"], PARAMS)
    settings = parse_params(raw).tune
    trial = parse_params(trial_raw(raw, {"train.optimizer.lr": 0.05, "train.schedule.name": "cosine"}, settings))
    assert trial.model.preset == "attention92"  # the profile still applies beneath
    assert (trial.train.optimizer.lr, trial.train.schedule.name) == (0.05, "cosine")
    assert (trial.train.epochs, trial.train.num_workers) == (settings.max_epochs, settings.workers_per_trial)


def config_cli(*args: str, cwd: Path = PARAMS.parent) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.config", *args], cwd=cwd, capture_output=True, text=True)


def test_pipeline_config_prints_what_would_run():
    result = config_cli("-S", "profile=fast", "-S", "train.epochs=30")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["profile"] == "fast" and resolved["train"]["epochs"] == 30
    assert resolved["train"]["optimizer"]["lr"] == shipped_params()["train"]["optimizer"]["lr"]
    assert yaml.safe_load(config_cli("-S", "profile=fast").stdout)["train"]["epochs"] == 24
    assert config_cli().stdout == PARAMS.read_text()  # without -S: params.yaml, what `dvc repro` runs


def test_dvc_exp_run_set_param_beats_the_profile(project):
    """`dvc exp run -S profile=fast -S train.epochs=3` composes params.yaml with 3 epochs (the
    fast profile sets 24): run as a user runs it, for the fetch stage only."""
    try:
        run(["dvc", "exp", "run", "-S", "profile=fast", "-S", "train.epochs=3", "fetch"], project)
        composed = yaml.safe_load((project / "params.yaml").read_text())
        assert (composed["profile"], composed["train"]["epochs"]) == ("fast", 3)
        assert composed["model"]["preset"] == "attention56_tiny"  # the project's conf/ beneath
    finally:
        run(["git", "checkout", "params.yaml"], project)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_are_refused_with_one_message(value):
    result = config_cli("-S", f"train.optimizer.lr={value}")
    assert result.returncode == 1 and result.stdout == ""
    assert "train.optimizer.lr: Input should be a finite number" in result.stderr
    assert "Traceback" not in result.stderr
