"""DVC stage `train`: data-parallel training with Ray Train (V2), tracked in MLflow.

The driver validates params, checks the tracking server and storage it will need, starts (or
joins) Ray, puts the prepared arrays into Ray's object store (so workers on any node of a
cluster get them, with no shared filesystem), opens the MLflow run and launches a TorchTrainer;
each worker runs `train_loop_per_worker`. Every epoch rank 0 checkpoints the full
training state through `ray.train.report`. The Ray run is named after a hash of everything that
shapes training, so rerunning an interrupted stage with the same params and data resumes from
the latest checkpoint (and the same MLflow run, found by its `ray_run` tag) instead of starting
over, while changed params start a fresh run. `ray.storage_path` may be local or s3://.

Outputs: models/model.pt (weights + model config), reports/train.json (DVC metrics),
reports/train_history.csv (DVC plots), models/mlflow_run.json (for the later stages).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import ray
import ray.train
from mlflow.tracking import MlflowClient

from pipeline.checkpoints import has_concluded, latest_state, load_checkpoint_state, save_trained_model
from pipeline.cluster import build_trainer, check_resources, resolve_storage_path, root_cause, start_ray
from pipeline.common import MODEL_FILE, RUN_FILE, StageError, run_stage
from pipeline.config import Params
from pipeline.remote import check_run_services, redact
from pipeline.tracking import backfill_metrics, mark_failed, open_training_run, resolve_tracking_uri
from resattn.data import load_prepared, write_csv, write_json

METRICS_FILE = Path("reports/train.json")
HISTORY_FILE = Path("reports/train_history.csv")


def run_identity(params: Params, data_hash: str) -> str:
    """Stable name for a training run: same params and data, same name, so a rerun resumes."""
    # How often an elastic run looks for capacity, and how much of a GPU a worker takes, do not
    # shape the run: changing them keeps it.
    shaping = {"model": params.model.model_dump(), "data": data_hash,
               "train": params.train.model_dump(exclude={"elastic_resize_seconds", "gpus_per_worker"})}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def fit(params: Params, data: tuple, tracking_uri: str, run_id: str, run_name: str, storage_path: str) -> dict:
    """Train (or resume) Ray run `run_name` on Ray; its final state."""
    start_ray(params)
    trainer = build_trainer(params, ray.put(data), tracking_uri, run_id, name=run_name, storage_path=storage_path)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise StageError(
            f"training run {run_name} failed and was restarted train.max_failures={params.train.max_failures} "
            f"time(s) without success: {root_cause(error)}. Its checkpoints stay in {storage_path}/{run_name}; "
            f"rerunning the stage resumes from them"
        ) from None
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    return load_checkpoint_state(result.checkpoint)


def train(params: Params) -> None:
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    check_run_services(params)
    check_resources(params, tracking_uri)
    prepared = Path(params.data.prepared_dir).resolve()
    data, data_hash = load_prepared(prepared)
    storage_path = resolve_storage_path(params)
    run_name = f"{params.ray.run_name}-{run_identity(params, data_hash)}"
    counts = {"train": len(data[0].labels), "val": len(data[1].labels)}
    run_id = open_training_run(params, tracking_uri, run_name, prepared, data_hash, counts)
    print(f"training run {run_name} (MLflow run {run_id}) on {params.train.workers_text} worker(s)", flush=True)

    try:
        state = latest_state(storage_path, run_name)
    except RuntimeError as error:
        raise StageError(f"training run {run_name} cannot resume: {error}. The files are left as they are; to train "
                         f"from scratch instead, remove {storage_path}/{run_name}") from None
    fit_seconds = None  # no training in this run of the stage
    if state is not None and has_concluded(state, params.train.epochs):
        print(f"training run {run_name} had already concluded; nothing to train", flush=True)
    else:
        started = time.monotonic()
        state = fit(params, data, tracking_uri, run_id, run_name, storage_path)
        fit_seconds = time.monotonic() - started
    if "diverged" in state:
        MODEL_FILE.unlink(missing_ok=True)  # no model for evaluate or register to pick up
        mark_failed(tracking_uri, run_id, state["diverged"])
        raise StageError(f"{state['diverged']}. No model was saved; the record stays in {storage_path}/{run_name}, "
                         f"so rerunning these params stops at once (they diverge the same way)")

    save_trained_model(state, params, MODEL_FILE)
    history = state["history"]
    # An epoch without validation (train.validate_every) has none of its figures: NaN, which DVC's
    # plots pass over, where they read an empty cell as 0 and draw the curve down to it.
    write_csv(HISTORY_FILE, history, missing="nan")
    final = history[-1]
    write_json(METRICS_FILE, {
        "epochs": final["epoch"],
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "train_accuracy": final["train_accuracy"],
        "best_val_accuracy": max(h["val_accuracy"] for h in history if "val_accuracy" in h),
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
        **({} if fit_seconds is None else {"fit_seconds": round(fit_seconds, 1)}),
    })
    write_json(RUN_FILE, {"run_id": run_id, "tracking_uri": params.mlflow.tracking_uri, "ray_run": run_name})
    client = MlflowClient(tracking_uri)
    try:
        if missed := backfill_metrics(client, run_id, history):
            print(f"logged {missed} epoch metric values that MLflow had missed", flush=True)
        client.log_artifact(run_id, str(HISTORY_FILE), "training")
        if fit_seconds is not None:
            client.log_metric(run_id, "fit_seconds", fit_seconds)
    except Exception as error:  # noqa: BLE001 - any tracking failure: the training itself is safe
        raise StageError(
            f"training finished and {MODEL_FILE} is saved, but MLflow at {redact(tracking_uri)} did not take the "
            f"run's metrics ({type(error).__name__}). Once it answers again, rerun this stage: it finds the "
            f"finished run and logs what is missing"
        ) from None
    took = "" if fit_seconds is None else f" ({fit_seconds / 60:.1f} min)"
    print(f"final validation accuracy {final['val_accuracy']:.4f} after {final['epoch']} epochs{took}; "
          f"model in {MODEL_FILE}")


if __name__ == "__main__":
    run_stage(__doc__, train)
