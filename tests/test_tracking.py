"""MLflow bookkeeping against a real MLflow store (sqlite): a training run is found again by
its name, carries MLflow's lineage tags and its dataset, and the driver logs exactly the epoch
metrics the workers could not; and, against a real MLflow server, concurrent registrations
leave the best model champion."""

from __future__ import annotations

import concurrent.futures
import random
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import parse_params
from pipeline.tracking import backfill_metrics, flatten, open_training_run
from helpers import ROOT, MlflowServer
from pipeline.registry import CHAMPION, TEST_ACCURACY_TAG, champion_version, scored_versions, settle_champion
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
    history.append({"epoch": 4, "train_loss": 0.4})  # an epoch without validation (train.validate_every)
    client.log_metric(run_id, "val_accuracy", 0.1, step=1)  # what a worker logged before an outage
    assert backfill_metrics(client, run_id, history) == 6
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4]
    assert backfill_metrics(client, run_id, history) == 0  # a second pass adds nothing


def test_concurrent_registrations_leave_the_best_model_champion(tmp_path):
    """Six registrations at once against a real MLflow server, three times: whatever order
    their reads and writes interleave in, `champion` ends on the best-scored version."""
    server = MlflowServer(tmp_path)
    server.start()
    try:
        client = MlflowClient(server.uri)
        client.create_registered_model("race")
        run_id = client.create_run(client.create_experiment("race")).info.run_id

        def register(score: float) -> None:
            own = MlflowClient(server.uri)  # one client per thread, as concurrent stages have
            version = own.create_model_version("race", f"runs:/{run_id}/model", run_id).version
            own.set_model_version_tag("race", version, TEST_ACCURACY_TAG, str(score))
            settle_champion(own, "race")

        for round_ in range(3):
            scores = [round(0.5 + 0.4 * random.Random(round_ * 10 + i).random(), 4) for i in range(6)]
            with concurrent.futures.ThreadPoolExecutor(len(scores)) as pool:
                list(pool.map(register, scores))
            scored = scored_versions(client, "race")
            assert scored[champion_version(client, "race")] == max(scored.values()), (round_, scored)

        # A champion moved by hand to an unscored version, or one with a score that is not a
        # number, stays where it is: no traceback, no silent replacement.
        for tag in (None, "n/a"):
            unscored = client.create_model_version("race", f"runs:/{run_id}/model", run_id).version
            if tag is not None:
                client.set_model_version_tag("race", unscored, TEST_ACCURACY_TAG, tag)
            client.set_registered_model_alias("race", CHAMPION, unscored)
            register(0.99)
            assert champion_version(client, "race") == unscored
    finally:
        server.stop()
