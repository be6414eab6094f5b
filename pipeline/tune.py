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
import json
import shlex
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipeline/tune.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import optuna
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import yaml
from mlflow.tracking import MlflowClient
from pydantic import BaseModel
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from pipeline.common import change_to_root
from pipeline.config import (
    DEFAULT_PARAMS,
    ConfigError,
    Params,
    TuneSection,
    deep_merge,
    flatten_mapping,
    overlay_for,
    parse_params,
    resolve,
)
from pipeline.evaluate import evaluate_model
from pipeline.ray_hooks import quiet_libraries
from pipeline.register import register_model
from pipeline.remote import check_run_services
from pipeline.train import (
    build_trainer,
    flatten,
    git_commit,
    load_checkpoint_state,
    load_prepared,
    log_params,
    resolve_storage_path,
    resolve_tracking_uri,
    save_model,
    start_ray,
)
from resattn.cifar10 import DataError
from resattn.data import write_csv
from resattn.model import CONFIG_FIELDS

METRIC = "val_accuracy"
SEARCHABLE_SECTIONS = ("model", "train")


# --------------------------------------------------------------------------------------------
# The search space


def check_path(key: str) -> None:
    """Raise ConfigError unless `key` names a searchable parameter."""
    parts = key.split(".")
    if parts[0] not in SEARCHABLE_SECTIONS:
        raise ConfigError(f"tune.space.{key}: only {' and '.join(SEARCHABLE_SECTIONS)} parameters can be searched")
    if parts[:2] == ["model", "overrides"]:
        if len(parts) != 3 or parts[2] not in CONFIG_FIELDS:
            raise ConfigError(f"tune.space.{key}: unknown model override; valid ones: {', '.join(CONFIG_FIELDS)}")
        return
    model: type[BaseModel] = Params
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "params"
            raise ConfigError(f"tune.space.{key}: {where} has no parameter {part!r}; it has {', '.join(fields)}")
        annotation = fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ConfigError(f"tune.space.{key}: {'.'.join(parts[: depth + 1])} is not a section")
            model = annotation


def sweep_layer(settings: TuneSection, sampled: dict[str, Any]) -> dict:
    """What a trial sets over the sweep's resolved params, the last layer of precedence
    (pipeline/config.py): its epoch budget, its worker count, then its sampled values."""
    layer = {"train": {"epochs": settings.max_epochs, "num_workers": settings.workers_per_trial}}
    for key, value in sampled.items():
        layer = deep_merge(layer, overlay_for(key, value))
    return layer


def trial_raw(resolved: dict, sampled: dict[str, Any], settings: TuneSection) -> dict:
    """The params of one trial: the sweep's resolved params (conf/, profile, -S), then the
    sweep's layer."""
    return deep_merge(resolved, sweep_layer(settings, sampled))


def validate_space(raw: dict, params: Params) -> None:
    """Fail before any trial starts: every path must exist and every choice and bound must make
    valid params on its own."""
    if not params.tune.space:
        raise ConfigError("tune.space is empty: give at least one parameter to search")
    problems = []
    for key, dimension in params.tune.space.items():
        check_path(key)
        for value in dimension.candidates():
            try:
                parse_params(trial_raw(raw, {key: value}, params.tune), "the trial params")
            except ConfigError as error:
                detail = str(error).split("\n", 1)[-1].strip()
                problems.append(f"tune.space.{key}: value {value!r} gives invalid params: {detail}")
    if problems:
        raise ConfigError("the search space is invalid:\n  " + "\n  ".join(problems))


def param_space(params: Params) -> dict[str, Any]:
    space = {}
    for key, dimension in params.tune.space.items():
        if dimension.choice is not None:
            space[key] = tune.choice(dimension.choice)
        elif dimension.uniform is not None:
            space[key] = tune.uniform(*dimension.uniform)
        else:
            space[key] = tune.loguniform(*dimension.loguniform)
    return space


# --------------------------------------------------------------------------------------------
# MLflow runs: one parent per sweep, one child per trial, found again on resume by their tags


def sweep_parent_run(client: MlflowClient, params: Params) -> str:
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.sweep = '{params.tune.name}' and tags.role = 'sweep'")
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment.experiment_id, run_name=f"sweep {params.tune.name}",
                            tags={"sweep": params.tune.name, "role": "sweep", "git_commit": git_commit()})
    log_params(client, run.info.run_id, flatten("tune", params.tune.model_dump()))
    return run.info.run_id


def trial_run_id(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str) -> str | None:
    found = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.trial_id = '{trial_id}'")
    return found[0].info.run_id if found else None


def trial_child_run(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str, params: Params,
                    sampled: dict) -> str:
    if existing := trial_run_id(client, experiment_id, parent_id, trial_id):
        return existing
    run = client.create_run(experiment_id, run_name=f"trial {trial_id}",
                            tags={"mlflow.parentRunId": parent_id, "trial_id": trial_id, "role": "trial",
                                  "seed": str(params.train.seed)})
    logged = flatten("", params.model_dump(exclude={"tune"}))
    logged.update({f"searched.{k}": str(v) for k, v in sampled.items()})
    log_params(client, run.info.run_id, logged)
    return run.info.run_id


# --------------------------------------------------------------------------------------------
# One trial: a Ray Train run of the pipeline's worker loop, reporting to Tune


def run_trial(sampled: dict, *, raw: dict, context: dict) -> None:
    params = parse_params(trial_raw(raw, sampled, context["settings"]), "the trial params")
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(context["tracking_uri"])
    run_id = trial_child_run(client, context["experiment_id"], context["parent_run_id"], trial_id, params, sampled)
    trainer = build_trainer(
        params, context["data"], context["tracking_uri"], run_id,
        # Derived from the trial id, so a restored sweep resumes this very Train run.
        name=f"{context['sweep']}-{trial_id}", storage_path=context["storage_path"], callbacks=[TuneReportCallback()],
    )
    trainer.fit()


# --------------------------------------------------------------------------------------------
# Reading the results


def trial_table(results: tune.ResultGrid, keys: list[str], max_epochs: int) -> list[dict]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        epochs = int(metrics.get("epoch", 0))
        rows.append({
            "trial": metrics.get("trial_id", "?"),
            **{key: result.config.get(key) for key in keys},
            "epochs": epochs,
            METRIC: metrics.get(METRIC),
            "stopped_early": bool(result.error is None and epochs < max_epochs),
            "status": "error" if result.error else "done",
        })
    return sorted(rows, key=lambda row: -(row[METRIC] or -1.0))


def format_table(rows: list[dict]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "—" if value is None else str(value)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def plot_results(rows: list[dict], space: dict, path: Path) -> None:
    """Validation accuracy against each searched parameter, one panel each; choices are
    categories in the order listed; hollow markers: stopped early by ASHA."""
    keys = list(space)
    columns = min(4, len(keys))
    lines = -(-len(keys) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 2.8 * lines), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        choices = space[key].choice
        for row in rows:
            if row[METRIC] is None:
                continue
            x = choices.index(row[key]) if choices is not None else row[key]
            ax.scatter([x], [row[METRIC]], facecolors="none" if row["stopped_early"] else "C0", edgecolors="C0")
        if choices is not None:
            ax.set_xticks(range(len(choices)), [str(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif space[key].loguniform is not None:
            ax.set_xscale("log")
        ax.set_xlabel(key, fontsize=8)
        ax.tick_params(which="both", labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    for line in axes:
        line[0].set_ylabel("val accuracy (last epoch)", fontsize=8)
    fig.suptitle("sweep trials: filled ran to the end, hollow stopped early by ASHA", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The driver


def concurrent_trials(params: Params) -> int:
    """Trials that fit the cluster at once. The trial functions ask for no CPU (their Train
    workers hold the resources), so Tune alone would start every trial and leave most of them
    queueing for workers, and TPE would learn nothing from finished trials."""
    resource = "GPU" if params.train.use_gpu else "CPU"
    available = int(ray.cluster_resources().get(resource, 0))
    return max(1, available // params.tune.workers_per_trial)


def reproduce_command(resolved: dict, assignments: list[str], layer: dict) -> str:
    """The `dvc exp run` line that trains a trial: the sweep's own `-S` assignments (its sweep
    settings left out), then the trial's layer. `dvc exp run -S` composes conf/ as the sweep
    did, and a later `-S` wins, so the line sets exactly the trial's params. A key that the
    sweep's `resolved` params lack takes Hydra's `+`."""
    present = flatten_mapping(resolved)
    kept = [a for a in assignments if not a.lstrip("+~").startswith("tune.")]
    for key, value in flatten_mapping(layer).items():
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)
        kept.append(f"{'' if key in present else '+'}{key}={text}")
    return " ".join(["dvc exp run", *(f"-S {shlex.quote(a)}" for a in kept)])


def sweep(params_path: Path = DEFAULT_PARAMS, assignments: list[str] = ()) -> dict:
    """Run the sweep of the params that `params_path` and the `-S` `assignments` resolve to."""
    raw = resolve(params_path, assignments)
    params = parse_params(raw, str(params_path))
    validate_space(raw, params)
    settings = params.tune
    check_run_services(params)
    data, _ = load_prepared(Path(params.data.prepared_dir).resolve())  # sweeps reuse the pipeline's arrays
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    parent_id = sweep_parent_run(client, params)
    experiment_id = client.get_run(parent_id).info.experiment_id
    storage_path = resolve_storage_path(params)
    start_ray(params, sweep=True)
    context = {"settings": settings, "tracking_uri": tracking_uri, "experiment_id": experiment_id,
               "parent_run_id": parent_id, "data": ray.put(data), "sweep": settings.name, "storage_path": storage_path}
    # The trial function only launches and waits: its Train workers hold the CPUs and GPUs.
    trainable = tune.with_resources(tune.with_parameters(run_trial, raw=raw, context=context),
                                    {"cpu": 0, "memory": 64 * 1024**2})
    concurrency = settings.max_concurrent_trials or concurrent_trials(params)
    experiment_path = f"{storage_path.rstrip('/')}/{settings.name}"
    if tune.Tuner.can_restore(experiment_path):
        print(f"resuming sweep {settings.name} from {experiment_path}", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(params),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=settings.num_samples,
                max_concurrent_trials=concurrency,
                search_alg=OptunaSearch(sampler=optuna.samplers.TPESampler(seed=settings.seed)),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=settings.max_epochs,
                                        grace_period=settings.grace_period,
                                        reduction_factor=settings.reduction_factor)
                if settings.early_stopping else FIFOScheduler(),
            ),
            # Upload the sweep's state (a few kB) at most 10 s apart rather than Tune's default 5 min:
            # on s3:// storage that bounds what a killed driver loses to the trials of 10 s.
            run_config=tune.RunConfig(name=settings.name, storage_path=storage_path,
                                      sync_config=tune.SyncConfig(sync_period=10)),
        )
    results = tuner.fit()

    keys = list(settings.space)
    rows = trial_table(results, keys, settings.max_epochs)
    reports = Path("reports/tune") / settings.name
    reports.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    (reports / "trials.md").write_text(table + "\n")
    write_csv(reports / "trials.csv", rows)
    plot_results(rows, settings.space, reports / "val_accuracy_vs_params.png")
    print(table)

    best = results.get_best_result(metric=METRIC, mode="max", scope="last")
    best_sampled = {key: best.config[key] for key in keys}
    best_params = parse_params(trial_raw(raw, best_sampled, settings), "the best trial's params")
    best_id = best.metrics["trial_id"]
    best_run_id = trial_run_id(client, experiment_id, parent_id, best_id)
    # Tune reports the path within the storage filesystem (no s3:// scheme): pass that filesystem.
    filesystem = pyarrow.fs.FileSystem.from_uri(storage_path)[0] if "://" in storage_path else None
    state = load_checkpoint_state(ray.train.Checkpoint(best.metrics[CHECKPOINT_PATH_KEY], filesystem=filesystem))
    model_path = reports / "model.pt"
    save_model(state, best_params, model_path)
    evaluation = evaluate_model(best_params, model_path, best_run_id, reports)
    registration = register_model(best_params, model_path, best_run_id, evaluation["test_accuracy"])

    (reports / "best_params.yaml").write_text(yaml.safe_dump(best_params.model_dump(), sort_keys=False))
    summary = {"best_trial": best_id, METRIC: best.metrics[METRIC], "test_accuracy":
               evaluation["test_accuracy"], "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
               "trial_epochs": sum(r["epochs"] for r in rows),
               "registered_version": registration["version"], "promoted": registration["promoted"],
               "best_params": best_sampled}
    (reports / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name in ("trials.md", "trials.csv", "val_accuracy_vs_params.png", "best_params.yaml", "summary.json"):
        client.log_artifact(parent_id, str(reports / name), "sweep")
    client.log_metric(parent_id, f"best_{METRIC}", best.metrics[METRIC])
    client.log_metric(parent_id, "best_test_accuracy", evaluation["test_accuracy"])
    client.set_tag(parent_id, "best_trial", best_id)
    for key, value in best_sampled.items():
        client.set_tag(parent_id, f"best.{key}", str(value))
    for row in rows:
        if run_id := trial_run_id(client, experiment_id, parent_id, row["trial"]):
            client.set_tag(run_id, "stopped_early", str(row["stopped_early"]).lower())
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
    try:
        sweep(args.params, args.set)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None

if __name__ == "__main__":
    main()
