"""MLflow bookkeeping against a real MLflow store (sqlite): a training run is found again by
its name, carries MLflow's lineage tags and its dataset, and the driver logs exactly the epoch
metrics the workers could not."""

from __future__ import annotations

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import parse_params
from pipeline.tracking import backfill_metrics, flatten, open_training_run
from helpers import ROOT
from pipeline.train import run_identity


@pytest.fixture
def params(tmp_path):
    return parse_params({"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"}})


def test_a_run_is_named_by_what_shapes_training_and_nothing_else(params):
    name = run_identity(params, "data-a")
    assert name == run_identity(params, "data-a") and len(name) == 12
    assert run_identity(params, "data-b") != name
    assert run_identity(params.model_copy(update={"train": params.train.model_copy(update={"epochs": 11})}),
                       "data-a") != name
    # Where runs are kept and tracked does not change what is trained.
    moved = params.model_copy(update={"ray": params.ray.model_copy(update={"storage_path": "s3://b/runs"})})
    assert run_identity(moved, "data-a") == name


def test_nested_params_flatten_to_mlflow_params():
    assert flatten("", {"train": {"epochs": 3, "schedule": {"milestones": [1.0, 2.0]}}, "profile": "fast",
                        "model": {"overrides": {}}}) == {
        "train.epochs": "3", "train.schedule.milestones": "[1.0, 2.0]", "profile": "fast", "model.overrides": "{}"}
    assert flatten("tune", {"max_epochs": 3}) == {"tune.max_epochs": "3"}


def test_a_training_run_is_found_again_with_lineage_and_its_dataset(params, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the project's git repository
    uri = params.mlflow.tracking_uri
    run_id = open_training_run(params, uri, "train-abc", tmp_path / "prepared", "f" * 64, {"train": 40, "val": 10})
    assert open_training_run(params, uri, "train-abc", tmp_path / "prepared", "f" * 64, {}) == run_id
    assert open_training_run(params, uri, "train-def", tmp_path / "prepared", "f" * 64, {}) != run_id
    run = MlflowClient(uri).get_run(run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["ray_run"] == "train-abc" and run.data.params["train.epochs"] == "10"
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == "f" * 32 and dataset_input.dataset.name == "cifar10-prepared"
    assert [(tag.key, tag.value) for tag in dataset_input.tags] == [("mlflow.data.context", "training")]


def test_backfill_logs_only_the_epochs_mlflow_missed(params):
    client = MlflowClient(params.mlflow.tracking_uri)
    run_id = client.create_run(client.create_experiment("backfill")).info.run_id
    history = [{"epoch": e, "val_accuracy": 0.1 * e, "train_loss": 2.0 / e} for e in (1, 2, 3)]
    client.log_metric(run_id, "val_accuracy", 0.1, step=1)  # what a worker logged before an outage
    assert backfill_metrics(client, run_id, history) == 5
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]
    assert backfill_metrics(client, run_id, history) == 0  # a second pass adds nothing
