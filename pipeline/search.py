"""A sweep's search: `tune.space` checked before any trial starts, each trial's params (the last
layer of precedence, pipeline/config.py), the Tuner (seeded TPE, ASHA) over Tune's sampling
domains, and the `dvc exp run` line that trains a trial through the pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import shlex
from typing import Any

import optuna
from pydantic import BaseModel
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from pipeline.cluster import cluster_capacity, worker_resources
from pipeline.config import ConfigError, Params, TuneSection, deep_merge, flatten_mapping, overlay_for, parse_params
from resattn.model import CONFIG_FIELDS

METRIC = "val_accuracy"

SEARCHABLE_SECTIONS = ("model", "train")


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
    (pipeline/config.py): its epoch budget, and no time budget (trials compared at the same
    epoch must have trained on the same schedule), its worker count, a validation every epoch
    (Tune's schedulers and searchers compare trials on each epoch's val_accuracy, and Tune
    refuses a result without it), then its sampled values."""
    layer = {"train": {"epochs": settings.max_epochs, "minutes": None, "num_workers": settings.workers_per_trial,
                       "validate_every": 1}}
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


def reproduce_command(resolved: dict, assignments: list[str], layer: dict) -> str:
    """The `dvc exp run` line that trains a trial: the sweep's own `-S` assignments (its sweep
    settings left out), then the trial's layer. `dvc exp run -S` composes conf/ as the sweep
    did, and a later `-S` wins, so the line sets exactly the trial's params. A key that the
    sweep's `resolved` params lack takes Hydra's `+`."""
    present = flatten_mapping(resolved)
    kept = [a for a in assignments if not a.lstrip("+~").startswith("tune.")]
    for key, value in flatten_mapping(layer).items():
        text = json.dumps(value) if value is None or isinstance(value, (list, dict, bool)) else str(value)
        kept.append(f"{'' if key in present else '+'}{key}={text}")
    return " ".join(["dvc exp run", *(f"-S {shlex.quote(a)}" for a in kept)])


# What a sweep is, besides its name: how many trials of what, searched and stopped how. How many
# run at once is not part of it.
SWEEP_SHAPING = frozenset(TuneSection.model_fields) - {"name", "max_concurrent_trials"}


def sweep_settings(settings: TuneSection) -> dict[str, Any]:
    return settings.model_dump(include=SWEEP_SHAPING)


def sweep_definition(settings: TuneSection, base_identity: str) -> str:
    """A digest of what a sweep runs: its settings and the identity of its trials' base params
    and data (pipeline.train.run_identity). A sweep resumed under another definition would mix
    the trials of two sweeps."""
    shaping = {"tune": sweep_settings(settings), "base": base_identity}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def concurrent_trials(params: Params, capacity: dict[str, float]) -> int:
    """Trials that fit the cluster at once, counting the nodes an autoscaler may add (a GPU
    cluster that scales from zero GPU workers still fans out). The trial functions ask for no
    CPU (their Train workers hold the resources), so Tune alone would start every trial and
    leave most of them queueing for workers, and TPE would learn nothing from finished trials."""
    per_trial = {key: amount * params.tune.workers_per_trial
                 for key, amount in worker_resources(params).items()}
    return max(1, min(int(capacity.get(key, 0) // amount) for key, amount in per_trial.items()))


class RestorableOptunaSearch(OptunaSearch):
    """Seeded TPE through Optuna that survives a restore whose searcher state disagrees with
    its trial list. Tune snapshots the two into separate files and uploads them one after the
    other, so a sweep driver killed in between leaves one older than the other.
    - A trial the snapshot predates (on the local stack in CI: two trials finished, the third
      just started) ended the restored sweep with a KeyError at its first result. It is
      adopted at its first result or its end, with the values it runs with (its config).
    - This searcher limits how many trials run at once itself (`set_max_concurrency`, so Tune's
      ConcurrencyLimiter passes everything through): the limiter's own lagging snapshot
      dropped the adopted trial's end, and Optuna never learnt its score.
    - It counts the trials running in this process only: those suggested here, and restored
      ones once they report. A trial in a snapshot newer than the trial list never runs, and
      counted as running it would hold a slot forever (the whole sweep, one trial at a time)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._max_concurrent = math.inf
        self._running: set[str] = set()

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = max_concurrent
        return True

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._running = set()

    def suggest(self, trial_id: str) -> dict | None:
        if len(self._running) >= self._max_concurrent:
            return None
        suggestion = super().suggest(trial_id)
        self._running.add(trial_id)
        return suggestion

    def _adopt(self, trial_id: str, result: dict | None) -> None:
        if trial_id in self._ot_trials or not result:  # a completed trial is in _ot_trials too
            return
        self._ot_study.enqueue_trial({name: result[f"config/{name}"] for name in self._space})
        self._ot_trials[trial_id] = self._ot_study.ask(fixed_distributions=self._space)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._adopt(trial_id, result)
        if trial_id not in self._completed_trials:
            self._running.add(trial_id)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._adopt(trial_id, result)
        self._running.discard(trial_id)
        if trial_id in self._ot_trials:  # a trial that failed before any result has nothing to tell
            super().on_trial_complete(trial_id, result, error)


def build_tuner(trainable, params: Params, storage_path: str, grid: dict[str, list] | None = None) -> tune.Tuner:
    """The sweep's Tuner: seeded TPE over `tune.space` with ASHA (or every trial to the end),
    or, given a `grid`, one trial per combination of its values, each to the end;
    `tune.max_concurrent_trials` trials at once (0: as many as the cluster fits). Or the sweep
    of the same name restored, to resume it."""
    settings = params.tune
    experiment_path = f"{storage_path.rstrip('/')}/{settings.name}"
    if tune.Tuner.can_restore(experiment_path):
        print(f"resuming sweep {settings.name} from {experiment_path}", flush=True)
        return tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    if grid is None:
        space = param_space(params)
        search = {"num_samples": settings.num_samples,
                  "search_alg": RestorableOptunaSearch(sampler=optuna.samplers.TPESampler(seed=settings.seed)),
                  "scheduler": ASHAScheduler(time_attr="training_iteration", max_t=settings.max_epochs,
                                             grace_period=settings.grace_period,
                                             reduction_factor=settings.reduction_factor)
                  if settings.early_stopping else FIFOScheduler()}
    else:
        space = {key: tune.grid_search(values) for key, values in grid.items()}
        search = {"num_samples": 1, "scheduler": FIFOScheduler()}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            max_concurrent_trials=settings.max_concurrent_trials or concurrent_trials(params, cluster_capacity()),
            **search,
        ),
        # Upload the sweep's state (a few kB) at most 10 s apart rather than Tune's default 5 min:
        # on s3:// storage that bounds what a killed driver loses to the trials of 10 s.
        run_config=tune.RunConfig(name=settings.name, storage_path=storage_path,
                                  sync_config=tune.SyncConfig(sync_period=10)),
    )
