"""Ray Tune sweeps: the search space is checked before any trial; a tiny sweep runs for real,
is killed after two trials and finishes on restore (ASHA, MLflow parent/child runs, the
registry); the ablation benchmark runs as its docstring says. Sweeps on a multi-node cluster:
test_cluster.py."""

from __future__ import annotations

import csv
import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from helpers import ROOT, kill_session, run, shipped_params, stage_env
from pipeline.config import ConfigError, compose, parse_params
from pipeline.search import (RestorableOptunaSearch, param_space, reproduce_command, sweep_layer, trial_raw,
                             validate_space)
from resattn.data import write_csv


def check(space: dict) -> None:
    raw = shipped_params()
    raw["tune"]["space"] = space
    validate_space(raw, parse_params(raw))


def test_the_shipped_search_space_is_valid():
    raw = shipped_params()
    validate_space(raw, parse_params(raw))


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ({}, "tune.space is empty"),
        ({"train.optimizer.lr": {"choice": []}}, "tune.space.train.optimizer.lr: choice is empty"),
        ({"train.optimizer.lr": {"loguniform": [0.4, 0.02]}}, "loguniform needs [low, high] with low < high; got [0.4, 0.02]"),
        ({"train.optimizer.lr": {"loguniform": [0.0, 0.1]}}, "loguniform needs low > 0"),
        ({"train.optimizer.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "give exactly one of choice, uniform, loguniform"),
        ({"train.optimiser.lr": {"choice": [0.1]}}, "tune.space.train.optimiser.lr: train has no parameter 'optimiser'"),
        ({"model.overrides.depth": {"choice": [56]}}, "tune.space.model.overrides.depth: unknown model override"),
        ({"data.split_seed": {"choice": [1, 2]}}, "only model and train parameters can be searched"),
        ({"train.schedule.name": {"choice": ["cosine", "cosin"]}}, "tune.space.train.schedule.name: value 'cosin' gives invalid params"),
        ({"model.overrides.r": {"choice": [1, 0]}}, "tune.space.model.overrides.r: value 0 gives invalid params"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(space, expected):
    with pytest.raises(ConfigError) as error:
        check(space)
    assert expected in str(error.value)


# --------------------------------------------------------------------------------------------
# Real sweeps on a local Ray instance


def run_sweep(project: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "pipeline" / "tune.py")],
                            cwd=project, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _finished_trials(experiment: Path) -> int:
    done = 0
    for result in experiment.glob("run_trial_*/result.json"):
        lines = result.read_text().strip().splitlines()
        done += bool(lines) and json.loads(lines[-1]).get("done", False)
    return done


def limited_searcher(kind, max_concurrent: int) -> ConcurrencyLimiter:
    """A sweep's searcher of class `kind`, wrapped as Tune wraps it."""
    limited = ConcurrencyLimiter(kind(sampler=optuna.samplers.TPESampler(seed=0)), max_concurrent=max_concurrent)
    limited.set_search_properties("val_accuracy", "max", param_space(parse_params(shipped_params())))
    return limited


def snapshot_and_restore(limited: ConcurrencyLimiter, path: Path) -> ConcurrencyLimiter:
    """What a restored sweep's searcher starts from: `limited` as saved now."""
    limited.save(str(path))
    restored = limited_searcher(type(limited.searcher), limited.max_concurrent)
    restored.set_state(limited.get_state())
    restored.restore(str(path))
    return restored


def flat_result(config: dict, score: float, epoch: int) -> dict:
    """A trial's result as Tune hands it to the searcher: flattened, its config included."""
    return {"val_accuracy": score, "training_iteration": epoch, **{f"config/{k}": v for k, v in config.items()}}


@pytest.mark.parametrize("kind", [OptunaSearch, RestorableOptunaSearch])
def test_a_restored_searcher_adopts_a_trial_its_snapshot_predates(kind, tmp_path):
    """Tune uploads a sweep's trial list and its searcher's snapshot one after the other: the
    snapshot can be older. The trial suggested in between reports to a searcher (and a
    concurrency limiter) that never saw it."""
    before = limited_searcher(kind, max_concurrent=2)
    first = before.suggest("first")
    before.on_trial_complete("first", flat_result(first, 0.4, 2))
    after = snapshot_and_restore(before, tmp_path / "searcher.pkl")
    second = before.suggest("second")  # the trial list records it; the snapshot does not
    if kind is OptunaSearch:  # Ray's own
        with pytest.raises(KeyError):
            after.on_trial_result("second", flat_result(second, 0.5, 1))
        return
    after.on_trial_result("second", flat_result(second, 0.5, 1))
    after.on_trial_complete("second", flat_result(second, 0.6, 2))
    told = [(trial.params, trial.value, trial.state) for trial in after.searcher._ot_study.trials]
    assert told == [(first, 0.4, optuna.trial.TrialState.COMPLETE), (second, 0.6, optuna.trial.TrialState.COMPLETE)]
    assert after.suggest("third") is not None and after.suggest("fourth") is not None
    assert after.suggest("fifth") is None  # two at a time, as the sweep asked


@pytest.mark.parametrize("kind", [OptunaSearch, RestorableOptunaSearch])
def test_a_restored_sweep_is_not_held_up_by_a_trial_only_its_searcher_knew(kind, tmp_path):
    """The other way round: the snapshot is newer than the trial list, and holds a trial that
    the restored sweep never runs. One trial at a time (a 2-core machine, 2 workers a trial)."""
    before = limited_searcher(kind, max_concurrent=1)
    before.suggest("never run")
    after = snapshot_and_restore(before, tmp_path / "searcher.pkl")
    suggested = after.suggest("next")
    assert (suggested is None) == (kind is OptunaSearch)  # Ray's own would wait forever


def _trial_curves(experiment: Path) -> list[tuple[int, list[float]]]:
    """(the order a trial started in, its validation accuracy per epoch) for each trial."""
    curves = []
    for result in experiment.glob("run_trial_*/result.json"):
        started = int(re.match(r"run_trial_[0-9a-f]+_(\d+)_", result.parent.name)[1])
        curves.append((started, [json.loads(line)["val_accuracy"] for line in result.read_text().splitlines()]))
    return curves


def _asha_stops(curves: list[list[float]], rungs: tuple[int, ...] = (2, 1), reduction_factor: float = 2) -> list[bool]:
    """Whether Ray's ASHA (one bracket, the sweep's rungs highest first) stops each of `curves`,
    trials run one after another: at the first rung an epoch reaches, a trial below the
    (1 - 1/reduction_factor) quantile of the earlier trials' values there stops."""
    recorded: dict[int, list[float]] = {rung: [] for rung in rungs}
    stops = []
    for curve in curves:
        seen, stopped = set(), False
        for epoch, value in enumerate(curve, 1):
            rung = next((rung for rung in rungs if epoch >= rung and rung not in seen), None)
            if rung is None:
                continue
            cutoff = np.nanpercentile(recorded[rung], (1 - 1 / reduction_factor) * 100) if recorded[rung] else None
            stopped = cutoff is not None and value < cutoff
            recorded[rung].append(value)
            seen.add(rung)
            if stopped:
                break
        stops.append(stopped)
    return stops


@pytest.mark.slow
def test_a_tiny_sweep_killed_after_two_trials_finishes_on_restore_and_registers_the_best(sweep_project):
    driver = subprocess.Popen([sys.executable, str(ROOT / "pipeline" / "tune.py")], cwd=sweep_project,
                              env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    experiment = sweep_project / "ray_results" / "tiny"
    try:
        deadline = time.monotonic() + 600
        while _finished_trials(experiment) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        kill_session(driver.pid)  # the third trial is starting
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the sweep ended before it could be interrupted"
    assert _finished_trials(experiment) == 2

    out = run_sweep(sweep_project).stdout
    assert "resuming sweep tiny" in out
    summary = json.loads((sweep_project / "reports/tune/tiny/summary.json").read_text())
    assert summary["trials"] == 3
    # ASHA's decisions, restored with the sweep: which trials stop depends on accuracies at chance
    # on this tiny data, which differ between CPUs (an AMX Xeon stopped none, the Zen CPUs one),
    # so they are checked against ASHA's rule applied to the curves the trials recorded.
    curves = [curve for _, curve in sorted(_trial_curves(experiment))]
    assert [len(curve) for curve in curves] == [3 if not stopped else len(curve)
                                                for curve, stopped in zip(curves, _asha_stops(curves))]
    assert summary["stopped_early"] == sum(_asha_stops(curves))
    assert "dvc exp run -S" in out and "| trial |" in out

    client = MlflowClient(f"sqlite:///{sweep_project / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("resattn-cifar10").experiment_id
    parents = client.search_runs([experiment_id], "tags.role = 'sweep' and tags.sweep = 'tiny'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3  # no trial was started twice
    assert all("searched.train.optimizer.lr" in child.data.params for child in children)
    stopped = [child for child in children if child.data.tags.get("stopped_early") == "true"]
    assert len(stopped) == summary["stopped_early"]
    for child in children:
        # Each epoch once, in order: a rerun trial would log its epochs a second time.
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert epochs == list(range(1, len(epochs) + 1)), (child.data.tags["trial_id"], epochs)
    best_child = next(c for c in children if c.data.tags["trial_id"] == summary["best_trial"])
    assert parent.data.tags["best_trial"] == summary["best_trial"]
    assert best_child.data.metrics["val_accuracy"] == max(c.data.metrics["val_accuracy"] for c in children
                                                         if c.data.tags.get("stopped_early") == "false")
    assert "test_accuracy" in best_child.data.metrics
    assert sum("test_accuracy" in c.data.metrics for c in children) == 1  # the test set, once
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.md", "sweep/val_accuracy_vs_params.png"} <= artifacts

    version = client.get_model_version("resattn-cifar10", str(summary["registered_version"]))
    assert version.run_id == best_child.info.run_id
    champion = client.get_model_version_by_alias("resattn-cifar10", "champion")
    assert champion.run_id == best_child.info.run_id  # the first model registered here

    # The same name with other settings would resume this sweep with them: refused before any trial.
    for assignment, change in [("tune.num_samples=4", "tune.num_samples 3 -> 4"),
                               ("train.label_smoothing=0.05", "the training params or the data of its trials differ")]:
        refused = subprocess.run([sys.executable, str(ROOT / "pipeline" / "tune.py"), "-S", assignment],
                                 cwd=sweep_project, env=stage_env(), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert refused.stderr.startswith(f"error: sweep 'tiny' already exists (MLflow run {parent.info.run_id}) and "
                                         f"ran with other settings: {change}. Resuming it would mix"), refused.stderr
        assert "resuming sweep" not in refused.stdout


@pytest.mark.parametrize("sweep_assignments", [[], ["profile=paper", "+model.overrides.p=2", "tune.num_samples=2"],
                                               ["profile=hour-cpu-fp32"], ["train.minutes=50"]])
def test_the_reproduce_line_composes_the_trial_params_under_any_profile(sweep_assignments):
    resolved = compose(sweep_assignments, ROOT / "params.yaml")
    settings = parse_params(resolved).tune
    sampled = {"model.overrides.r": 2, "train.optimizer.lr": 0.05}
    line = reproduce_command(resolved, sweep_assignments, sweep_layer(settings, sampled))
    assert line.startswith("dvc exp run -S ") and "tune." not in line
    if not sweep_assignments:
        assert line == ("dvc exp run -S train.epochs=3 -S train.minutes=null -S train.num_workers=1 "
                        "-S train.validate_every=1 -S train.optimizer.lr=0.05 -S +model.overrides.r=2")
    # What `dvc exp run` composes from the line is the trial's params, sweep settings aside.
    reproduced = compose(shlex.split(line)[4::2], ROOT / "params.yaml")
    trial = trial_raw(resolved, sampled, settings)
    assert {**reproduced, "tune": None} == {**trial, "tune": None}
    assert trial["train"]["epochs"] == settings.max_epochs and trial["train"]["optimizer"]["lr"] == 0.05
    assert trial["train"]["minutes"] is None  # trials compared at an epoch trained the same schedule
    # Whatever the profile's validation interval, Tune compares trials on every epoch.
    assert trial["train"]["validate_every"] == 1


@pytest.mark.slow
def test_the_ablation_trains_each_variant_and_seed_in_one_sweep_and_tables_accuracy_and_minutes(project):
    run(["dvc", "repro", "preprocess"], project)  # as the benchmark's docstring says, then the benchmark
    ablation = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--profile", "quick-cpu", "--epochs", "2",
                "--seeds", "0", "1", "--variants", "progressive-resizing", "weight-average"]
    result = subprocess.run(ablation, cwd=project, env=stage_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    name = re.search(r"^sweep (ablation-quick-cpu-2ep-\w+): 3 variants x 2 seeds", result.stdout, re.M).group(1)
    assert "| progressive-resizing | train.progressive_resizing.start_size=16 |" in result.stdout
    with open(project / "reports/ablation" / name / "table.csv") as table:
        rows = {row["variant"]: row for row in csv.DictReader(table)}
    assert list(rows) == ["recipe", "progressive-resizing", "weight-average"]
    for row in rows.values():
        assert all(0 <= float(row[column]) <= 1 for column in ("seed 0", "seed 1", "mean"))
        assert float(row["spread"]) == abs(float(row["seed 0"]) - float(row["seed 1"]))
        assert float(row["minutes"]) > 0
    assert float(rows["recipe"]["vs recipe"]) == 0
    # Under the average, the weights trained exactly as the recipe's: the same scores, seed by seed.
    assert [rows["weight-average"][f"unaveraged seed {seed}"] for seed in (0, 1)] == [rows["recipe"]["seed 0"],
                                                                                     rows["recipe"]["seed 1"]]
    assert rows["recipe"]["unaveraged seed 0"] == "nan"

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("resattn-cifar10").experiment_id
    (parent,) = client.search_runs([experiment_id], f"tags.role = 'sweep' and tags.sweep = '{name}'")
    assert {"mean_val_accuracy.recipe", "mean_val_accuracy.progressive-resizing"} <= set(parent.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")} == {
        "ablation/table.md", "ablation/table.csv", "ablation/curves.csv", "ablation/curves.png"}
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trained_sizes = sorted(
        (child.data.params["searched.train.seed"], child.data.params["train.progressive_resizing.start_size"],
         [m.value for m in client.get_metric_history(child.info.run_id, "image_size")]) for child in children)
    # Each trial trained what its variant changes, and nothing else: the recipe and the weight
    # average at 32 px, progressive resizing's two epochs on the ramp from 16 px.
    assert trained_sizes == [("0", "0", [32, 32]), ("0", "0", [32, 32]), ("0", "16", [16, 24]),
                             ("1", "0", [32, 32]), ("1", "0", [32, 32]), ("1", "16", [16, 24])]

    # A later sitting adds a variant without training the recipe again: the same seeds on the same
    # machine train the same weights, so its rows join the first table.
    result = subprocess.run([*ablation[:-1], "--without-recipe"], cwd=project, env=stage_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    later = re.search(r"^sweep (ablation-quick-cpu-2ep-\w+): 1 variant x 2 seeds", result.stdout, re.M).group(1)
    assert later != name
    with open(project / "reports/ablation" / later / "table.csv") as table:
        (added,) = csv.DictReader(table)
    assert added["variant"] == "progressive-resizing" and added["vs recipe"] == "nan"
    first = rows["progressive-resizing"]
    assert [added["seed 0"], added["seed 1"]] == [first["seed 0"], first["seed 1"]]

    # The two sittings' curves, each trial once, make the first sitting's table again, but for the
    # minutes progressive resizing took in the later sitting.
    with open(project / "reports/ablation" / name / "curves.csv") as curves:
        earlier = [row for row in csv.DictReader(curves) if row["variant"] != "progressive-resizing"]
    write_csv(project / "earlier.csv", earlier)
    combine = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--combine", "earlier.csv",
               f"reports/ablation/{later}/curves.csv", "--out", "combined"]
    result = subprocess.run(combine, cwd=project, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(project / "combined" / "table.csv") as table:
        combined = {row["variant"]: row for row in csv.DictReader(table)}
    assert combined == {**rows, "progressive-resizing": {**first, "minutes": added["minutes"]}}
    assert (project / "combined" / "curves.png").stat().st_size > 0


def test_combining_ablation_sittings_tables_each_trial_once_and_names_a_file_that_repeats_one(tmp_path):
    def trial(variant: str, seed: int, accuracies: list[float], unaveraged: list[float] | None = None) -> list[dict]:
        return [{"variant": variant, "seed": seed, "epoch": epoch, "val_accuracy": accuracy,
                 "val_accuracy_unaveraged": unaveraged[epoch - 1] if unaveraged else "",
                 "training_minutes": 2.0 * epoch} for epoch, accuracy in enumerate(accuracies, 1)]

    write_csv(tmp_path / "recipe.csv", trial("recipe", 0, [0.5, 0.8]) + trial("recipe", 1, [0.4, 0.7]))
    write_csv(tmp_path / "average.csv", trial("weight-average", 0, [0.55, 0.85], [0.5, 0.8])
              + trial("weight-average", 1, [0.45, 0.75], [0.4, 0.7]))
    ablation = [sys.executable, str(ROOT / "benchmarks" / "ablation.py"), "--out", "out", "--combine"]
    # Listed in any order, the recipe's row comes first and the others are measured against it.
    result = subprocess.run([*ablation, "average.csv", "recipe.csv"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "table.csv") as table:
        rows = {row["variant"]: {key: float(value) for key, value in row.items() if key not in ("variant", "changes")}
                for row in csv.DictReader(table)}
    assert list(rows) == ["recipe", "weight-average"]
    assert rows["weight-average"] == pytest.approx({
        "seed 0": 0.85, "seed 1": 0.75, "mean": 0.80, "spread": 0.10, "vs recipe": 0.05, "minutes": 4.0,
        "unaveraged seed 0": 0.8, "unaveraged seed 1": 0.7})
    assert "| weight-average | train.ema_decay=0.999 | 85.00 | 75.00 | 80.00 | 10.00 | +5.00 | 4.0 |" in result.stdout

    write_csv(tmp_path / "again.csv", trial("recipe", 1, [0.4, 0.7]))
    result = subprocess.run([*ablation, "recipe.csv", "average.csv", "again.csv"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: recipe.csv and again.csv both hold variant 'recipe', seed 1: "
                                     "give each trial's curve once")
