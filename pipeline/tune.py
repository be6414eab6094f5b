"""Ray Tune search over the network's p/t/r, depth presets and learning-rate schedules.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipeline/tune.py --root $PWD
    python pipeline/tune.py [--params params.yaml] [-S key=value ...]   # on a Ray it starts itself

The `tune` section of params.yaml gives the sweep: dotted parameter paths (`train.optimizer.lr`,
`model.overrides.r`, ...) with their ranges, seeded TPE search (Optuna) and ASHA early stopping
on validation accuracy. Each trial is a data-parallel Ray Train run of the pipeline's own worker
loop, logged as an MLflow child run of the sweep's parent run. At the end, only the best trial
is evaluated on the test set, registered, and made champion if it beats the current one.

Sweeps live beside the DVC DAG, not in it: they are exploratory and long. `-S` works as for
`dvc exp run`: on params.yaml it composes conf/ afresh. The sweep writes the best trial's params
to reports/tune/<name>/best_params.yaml and prints the `dvc exp run -S ...` line that reproduces
it through the pipeline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # `python pipeline/tune.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow
import pyarrow.fs
import ray
import ray.train
import yaml
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from pipeline.checkpoints import load_checkpoint_state, recorded_result, save_trained_model
from pipeline.cluster import build_trainer, check_resources, resolve_storage_path, start_ray
from pipeline.common import change_to_root, failing_in_one_line
from pipeline.config import DEFAULT_PARAMS, Params, parse_params, resolve
from pipeline.evaluate import evaluate_model
from pipeline.ray_hooks import quiet_libraries
from pipeline.register import register_model
from pipeline.remote import check_run_services
from pipeline.search import (
    METRIC,
    build_tuner,
    reproduce_command,
    sweep_definition,
    sweep_layer,
    sweep_settings,
    trial_raw,
    validate_space,
)
from pipeline.sweep_results import trial_table, write_results
from pipeline.train import run_identity
from pipeline.tracking import (
    lineage_tags,
    record_sweep,
    resolve_tracking_uri,
    sweep_parent_run,
    trial_child_run,
    trial_run_id,
)
from resattn.data import load_prepared, write_json, write_text


# --------------------------------------------------------------------------------------------
# One trial: a Ray Train run of the pipeline's worker loop, reporting to Tune


def concluded_trial_result(storage_path: str, run_name: str, epochs: int) -> dict | None:
    """The last result of a trial's Train run that has trained all its `epochs` (or diverged),
    as TuneReportCallback reported it to Tune; None for a run yet to start or to finish."""
    result = recorded_result(storage_path, run_name)
    if result is None or not (result.metrics.get("epoch") == epochs or "diverged" in result.metrics):
        return None
    return result.metrics | {CHECKPOINT_PATH_KEY: result.checkpoint.path}


def run_trial(sampled: dict, *, raw: dict, context: dict) -> None:
    params = parse_params(trial_raw(raw, sampled, context["settings"]), "the trial params")
    trial_id = tune.get_context().get_trial_id()
    # Derived from the trial id, so a restored sweep resumes this very Train run.
    run_name = f"{context['sweep']}-{trial_id}"
    if concluded := concluded_trial_result(context["storage_path"], run_name, params.train.epochs):
        # Tune saves its record of the trials every 10 s at most. A sweep stopped in between
        # reruns a trial whose Train run had concluded, which trains nothing and so reported
        # nothing: Tune kept the last result it had recorded, of an earlier epoch, whose
        # checkpoint Train had deleted (it keeps two), and the sweep failed reading it.
        tune.report(concluded)
        return
    client = MlflowClient(context["tracking_uri"])
    run_id = trial_child_run(client, context, trial_id, params, sampled)
    trainer = build_trainer(params, context["data"], context["tracking_uri"], run_id, name=run_name,
                            storage_path=context["storage_path"], callbacks=[TuneReportCallback()])
    trainer.fit()


# --------------------------------------------------------------------------------------------
# The driver


def open_sweep(raw: dict, params: Params) -> dict:
    """Everything a sweep needs before its first trial, whatever chooses its trials: the checks,
    the pipeline's prepared arrays in Ray's object store, the MLflow parent run (found again by
    the sweep's name, to resume it) and Ray itself. Returns the context every trial gets."""
    settings = params.tune
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    check_run_services(params)
    # Each trial asks of the cluster what a training run with the sweep's layer asks.
    trial_base = parse_params(trial_raw(raw, {}, settings), "the trial params")
    check_resources(trial_base, tracking_uri)
    prepared = Path(params.data.prepared_dir).resolve()
    data, data_hash = load_prepared(prepared)  # sweeps reuse the pipeline's arrays
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    lineage = lineage_tags()
    definition = sweep_definition(settings, run_identity(trial_base, data_hash))
    parent_id = sweep_parent_run(client, params, lineage, definition, sweep_settings(settings))
    experiment_id = client.get_run(parent_id).info.experiment_id
    storage_path = resolve_storage_path(params)
    start_ray(params, sweep=True)
    return {"settings": settings, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
            "parent_run_id": parent_id, "data": ray.put(data), "sweep": settings.name,
            "storage_path": storage_path, "lineage": lineage,
            "dataset": (prepared, data_hash, {"train": len(data[0].labels), "val": len(data[1].labels)})}


def trial_trainable(trial_function: Callable, **parameters) -> Callable | type[tune.Trainable]:
    """`trial_function(config, **parameters)` as Tune runs it. It only launches a Train run and
    waits: its Train workers hold the CPUs and GPUs."""
    return tune.with_resources(tune.with_parameters(trial_function, **parameters), {"cpu": 0, "memory": 64 * 1024**2})


def sweep(params_path: Path = DEFAULT_PARAMS, assignments: list[str] = ()) -> dict:
    """Run the sweep of the params that `params_path` and the `-S` `assignments` resolve to."""
    raw = resolve(params_path, assignments)
    params = parse_params(raw, str(params_path))
    validate_space(raw, params)
    settings = params.tune
    context = open_sweep(raw, params)
    tracking_uri, experiment_id, parent_id = context["tracking_uri"], context["experiment_id"], context["parent_run_id"]
    client = MlflowClient(tracking_uri)
    tuner = build_tuner(trial_trainable(run_trial, raw=raw, context=context), params, context["storage_path"])
    results = tuner.fit()

    keys = list(settings.space)
    rows = trial_table(results, keys, settings.max_epochs)
    reports = Path("reports/tune") / settings.name
    print(write_results(rows, settings.space, reports))

    best = results.get_best_result(metric=METRIC, mode="max", scope="last")
    best_sampled = {key: best.config[key] for key in keys}
    best_params = parse_params(trial_raw(raw, best_sampled, settings), "the best trial's params")
    best_id = best.metrics["trial_id"]
    best_run_id = trial_run_id(client, experiment_id, parent_id, best_id)
    # Tune reports the path within the storage filesystem (no s3:// scheme): pass that filesystem.
    storage_path = context["storage_path"]
    filesystem = pyarrow.fs.FileSystem.from_uri(storage_path)[0] if "://" in storage_path else None
    state = load_checkpoint_state(ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY], filesystem=filesystem))
    model_path = reports / "model.pt"
    save_trained_model(state, best_params, model_path)
    evaluation = evaluate_model(best_params, model_path, best_run_id, reports)
    registration = register_model(best_params, model_path, best_run_id, evaluation["test_accuracy"])

    write_text(reports / "best_params.yaml", yaml.safe_dump(best_params.model_dump(), sort_keys=False))
    summary = {"best_trial": best_id, METRIC: best.metrics[METRIC], "test_accuracy":
               evaluation["test_accuracy"], "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
               "trial_epochs": sum(r["epochs"] for r in rows),
               "registered_version": registration["version"], "promoted": registration["promoted"],
               "best_params": best_sampled}
    write_json(reports / "summary.json", summary)
    record_sweep(client, experiment_id, parent_id, summary, rows, reports)
    print(f"best trial {summary['best_trial']}: {METRIC} {best.metrics[METRIC]:.4f}, test accuracy "
          f"{evaluation['test_accuracy']:.4f}; reproduce through the pipeline with:\n  "
          f"{reproduce_command(raw, list(assignments), sweep_layer(settings, best_sampled))}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="relative to --root")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, as `dvc exp run -S` does (e.g. -S ray.storage_path=s3://b/runs)")
    parser.add_argument("--root", type=Path, help="project directory that relative paths in params refer to "
                        "(default: the current one). A Ray job runs in an uploaded copy of the code without the "
                        "data: on this machine's cluster pass --root $PWD; on a remote one, run the fetch and "
                        "preprocess stages in the job first (infra/README.md)")
    args = parser.parse_args(argv)
    change_to_root(args.root)
    quiet_libraries()
    with failing_in_one_line():
        sweep(args.params, args.set)


if __name__ == "__main__":
    main()
