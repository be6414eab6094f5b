"""MLflow bookkeeping of training runs and sweeps: where runs are found again, what they record.

A training run's MLflow run is found again by its `ray_run` tag, so a resumed training logs
into the run it started. Lineage uses MLflow's own names, so the UI's Source and Version
columns and the Dataset column are filled: `mlflow.source.*` tags and the prepared data as a
dataset input with its digest. Ray Train's controller logs each epoch once it has it from every
worker (`EpochLogger`); during a tracking outage it skips it and the driver logs what is
missing afterwards (`backfill_metrics`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import ray.train
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT

from pipeline.config import ConfigError, Params, flatten_mapping

MLFLOW_BATCH_LIMIT = 1000  # metrics per log_batch call
MLFLOW_PARAM_LIMIT = 6000  # characters of a param value


def resolve_tracking_uri(uri: str) -> str:
    """Workers run in other directories: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def flatten(prefix: str, mapping: dict) -> dict[str, str]:
    """Nested params as MLflow params: {"train": {"epochs": 3}} -> {"train.epochs": "3"}; lists
    and empty mappings as JSON."""
    return {key: json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for key, value in flatten_mapping(mapping, prefix).items()}


def log_params(client: MlflowClient, run_id: str, flat: dict[str, str]) -> None:
    client.log_batch(run_id, params=[Param(k, v[:MLFLOW_PARAM_LIMIT]) for k, v in flat.items()])


def git_commit() -> str | None:
    """The commit of the project in the current directory (the project root: a Ray job's entry
    point runs from an uploaded copy that is no git repository, then changes to --root)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def lineage_tags() -> dict[str, str]:
    """MLflow's source tags (user, entry point, its type, git commit), as its fluent API sets them."""
    tags = resolve_tags()
    if commit := git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


def log_dataset(client: MlflowClient, run_id: str, prepared_dir: Path, digest: str, counts: dict[str, int]) -> None:
    """The prepared arrays as the run's training input, with the digest that names the run."""
    dataset = Dataset(name="cifar10-prepared", digest=digest[:32], source_type="local", source=str(prepared_dir),
                      profile=json.dumps(counts))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def open_training_run(params: Params, tracking_uri: str, run_name: str, prepared_dir: Path, data_digest: str,
                      counts: dict[str, int]) -> str:
    """The MLflow run of a training run: the one tagged with its Ray run name (a resume), else a
    new one with its params, lineage and dataset. The tag lives with the run, so this works
    whatever the Ray storage."""
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    if found := client.search_runs([experiment.experiment_id], f"tags.ray_run = '{run_name}'", max_results=1):
        return found[0].info.run_id
    tags = lineage_tags() | {"ray_run": run_name, "seed": str(params.train.seed), "profile": params.profile}
    run = client.create_run(experiment.experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, flatten("", params.model_dump()))
    log_dataset(client, run.info.run_id, prepared_dir, data_digest, counts)
    return run.info.run_id


def log_epoch(tracking_uri: str, run_id: str, metrics: dict, epoch: int) -> None:
    """One epoch's metrics; an outage costs a warning, not the training."""
    try:
        MlflowClient(tracking_uri).log_batch(
            run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), epoch) for k, v in metrics.items()])
    except Exception as error:  # noqa: BLE001 - a tracking outage must not cost the training
        print(f"warning: could not log epoch {epoch} to MLflow ({type(error).__name__}); training goes on "
              f"and the driver logs it when MLflow is back", flush=True)


class EpochLogger(ray.train.UserCallback):
    """Logs each epoch to MLflow run `run_id` when Ray Train's controller has it from every
    worker, with its checkpoint. A worker that logged for itself logged an epoch twice when a
    worker failed after logging but before the controller had its report: that epoch was
    trained again after the restart, and MLflow held two values at one step."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        epoch = dict(metrics[0])  # rank 0's; every worker reports the same global figures
        if not epoch.pop("diverged", 0.0):
            log_epoch(self.tracking_uri, self.run_id, epoch, int(epoch.pop("epoch")))


def tag_run(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Tags from a worker; an outage costs a warning, not the training."""
    try:
        client = MlflowClient(tracking_uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    except Exception as error:  # noqa: BLE001 - a tracking outage must not cost the training
        print(f"warning: could not tag the MLflow run ({type(error).__name__})", flush=True)


def start_system_metrics(tracking_uri: str, run_id: str) -> bool:
    """CPU, memory and GPU use sampled into the run while training, if MLflow answers."""
    try:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
        return True
    except Exception as error:  # noqa: BLE001 - a tracking outage must not cost the training
        print(f"warning: MLflow is unreachable ({type(error).__name__}); training goes on without "
              f"system metrics", flush=True)
        return False


def stop_system_metrics() -> None:
    try:
        mlflow.end_run()
    except Exception:  # noqa: BLE001 - the driver reports MLflow trouble once, at the end
        pass


def backfill_metrics(client: MlflowClient, run_id: str, history: list[dict]) -> int:
    """Log every epoch metric the MLflow run lacks (workers skip logging during an outage);
    returns how many values were missing."""
    keys = {key for row in history for key in row} - {"epoch"}
    logged = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    now = int(time.time() * 1000)
    missing = [Metric(key, float(value), now, row["epoch"])
               for row in history for key, value in row.items() if key != "epoch" and row["epoch"] not in logged[key]]
    for start in range(0, len(missing), MLFLOW_BATCH_LIMIT):
        client.log_batch(run_id, metrics=missing[start : start + MLFLOW_BATCH_LIMIT])
    return len(missing)


def mark_failed(tracking_uri: str, run_id: str, reason: str) -> None:
    """The MLflow run ends FAILED, with the reason as a tag, so the UI does not show it running."""
    try:
        client = MlflowClient(tracking_uri)
        client.set_tag(run_id, "failure", reason[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception as error:  # noqa: BLE001 - the stage fails with its own message anyway
        print(f"warning: could not mark MLflow run {run_id} failed ({type(error).__name__})", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Sweeps: one parent run per sweep, one child per trial, found again on resume by their tags



def sweep_parent_run(client: MlflowClient, params: Params, lineage: dict[str, str], definition: str,
                     settings: dict[str, Any]) -> str:
    """The sweep's parent run: found again by the sweep's name, to resume it, or created. A
    sweep of that name with another `definition` (search.sweep_definition) is refused, naming
    what changed among its `settings` (search.sweep_settings): resuming would mix two sweeps."""
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.sweep = '{params.tune.name}' and tags.role = 'sweep'")
    if found:
        recorded = found[0].data.tags.get("sweep_definition")
        if recorded not in (None, definition):
            logged = found[0].data.params
            changes = [f"{key} {logged.get(key, '(unset)')} -> {value}"
                       for key, value in flatten("tune", settings).items() if logged.get(key) != value]
            raise ConfigError(
                f"sweep {params.tune.name!r} already exists (MLflow run {found[0].info.run_id}) and ran with other "
                f"settings: {'; '.join(changes) or 'the training params or the data of its trials differ'}. "
                f"Resuming it would mix the trials of two sweeps: set a new tune.name to start another, or rerun it "
                f"with the params it started with to resume it")
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=f"sweep {params.tune.name}",
                            tags=lineage | {"sweep": params.tune.name, "role": "sweep", "sweep_definition": definition})
    log_params(client, run.info.run_id, flatten("tune", params.tune.model_dump()))
    return run.info.run_id


def trial_run_id(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str) -> str | None:
    found = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.trial_id = '{trial_id}'")
    return found[0].info.run_id if found else None


def trial_child_run(client: MlflowClient, context: dict, trial_id: str, params: Params, sampled: dict) -> str:
    experiment_id, parent_id = context["experiment_id"], context["parent_run_id"]
    if existing := trial_run_id(client, experiment_id, parent_id, trial_id):
        return existing
    run = client.create_run(experiment_id, run_name=f"trial {trial_id}",
                            tags=context["lineage"] | {"mlflow.parentRunId": parent_id, "trial_id": trial_id,
                                                       "role": "trial", "seed": str(params.train.seed)})
    logged = flatten("", params.model_dump(exclude={"tune"}))
    logged.update({f"searched.{k}": str(v) for k, v in sampled.items()})
    log_params(client, run.info.run_id, logged)
    log_dataset(client, run.info.run_id, *context["dataset"])
    return run.info.run_id


def record_sweep(client: MlflowClient, experiment_id: str, parent_id: str, summary: dict, rows: list[dict],
                 reports: Path) -> None:
    """A finished sweep on its parent run (the best trial, its scores, the reports) and on each
    trial's run whether ASHA stopped it early."""
    for name in ("trials.md", "trials.csv", "val_accuracy_vs_params.png", "best_params.yaml", "summary.json"):
        client.log_artifact(parent_id, str(reports / name), "sweep")
    client.log_metric(parent_id, "best_val_accuracy", summary["val_accuracy"])
    client.log_metric(parent_id, "best_test_accuracy", summary["test_accuracy"])
    client.set_tag(parent_id, "best_trial", summary["best_trial"])
    for key, value in summary["best_params"].items():
        client.set_tag(parent_id, f"best.{key}", str(value))
    for row in rows:
        if run_id := trial_run_id(client, experiment_id, parent_id, row["trial"]):
            client.set_tag(run_id, "stopped_early", str(row["stopped_early"]).lower())
