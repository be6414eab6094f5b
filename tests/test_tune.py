"""Ray Tune sweeps: the search space is checked before any trial; a tiny sweep runs for real,
is killed after two trials and finishes on restore (ASHA, MLflow parent/child runs, the
registry); on the local stack a sweep killed mid-way is restored by a Ray job, with its state in
S3 and its models behind the MLflow server."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import boto3
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import ROOT, free_port, kill_session, local_stack, session_processes, shipped_params, stage_env, synthetic_split
from pipeline.config import ConfigError, compose, parse_params
from pipeline.search import reproduce_command, sweep_layer, trial_raw, validate_space
from resattn.cifar10 import write_cifar_format


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


@pytest.fixture(scope="module")
def sweep_project(tmp_path_factory) -> Path:
    """A directory with prepared small CIFAR-format data and a tiny sweep's params, all paths
    absolute so a Ray job's working directory can use them too."""
    root = tmp_path_factory.mktemp("sweep")
    source = root / "source" / "cifar-10-batches-py"
    checksums = write_cifar_format(source, synthetic_split(300, 0), synthetic_split(100, 1))
    (root / "small.md5").write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))
    raw = shipped_params()
    raw["data"] |= {"source": str(source), "checksums": str(root / "small.md5"), "validation_size": 60,
                    "raw_dir": str(root / "data/raw"), "prepared_dir": str(root / "data/prepared")}
    raw["model"] = {"preset": "attention56_tiny", "overrides": {}}
    raw["train"] |= {"batch_size": 32, "num_workers": 1, "eval_batch_size": 100}
    raw["train"]["schedule"] = {"name": "onecycle", "warmup_epochs": 0.5}
    raw["evaluate"] |= {"mask_images": 2, "batch_size": 50}
    raw["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    raw["ray"]["storage_path"] = str(root / "ray_results")
    # One trial at a time: the trial order, and so ASHA's decisions, are fixed by the seed.
    raw["tune"] = {"name": "tiny", "num_samples": 3, "seed": 0, "max_epochs": 3, "grace_period": 1,
                   "reduction_factor": 2, "workers_per_trial": 1, "max_concurrent_trials": 1,
                   "space": {"train.optimizer.lr": {"loguniform": [1e-5, 0.3]}, "model.overrides.r": {"choice": [1, 2]}}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("fetch", "preprocess"):  # as a user runs them, in the project directory
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=root, check=True, capture_output=True,
                       env=stage_env() | {"PYTHONPATH": str(ROOT)})
    return root


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
    assert summary["stopped_early"] >= 1
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


# --------------------------------------------------------------------------------------------
# The cluster workflow on the local stack (infra/local_stack.py): a Ray head, an MLflow server
# with S3 artifacts and an S3-compatible server, all real processes on 127.0.0.1


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("stack")
    command = [sys.executable, str(ROOT / "infra" / "local_stack.py")]
    options = ["--dir", str(state_dir), "--num-cpus", "2"]
    for name in local_stack.PORTS:  # none of Ray's defaults: another Ray may hold them
        options += [f"--{name}-port", str(free_port())]
    up = subprocess.run(command + ["up"] + options, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-4000:]
    state = json.loads((state_dir / "stack.json").read_text())
    try:
        yield state
    finally:
        down = subprocess.run(command + ["down"] + options, env=stage_env(), capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        assert not any(session_processes(session) for session in state["sessions"].values())
        # Every Ray process names its temp dir on its command line: none may outlive `down`.
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if state["ray_temp_dir"] in " ".join(p.info["cmdline"] or [])]
        assert not left, left


def stack_overrides(state: dict) -> list[str]:
    return ["-S", "ray.address=auto", "-S", f"ray.storage_path=s3://{state['buckets']['ray']}/runs",
            "-S", f"mlflow.tracking_uri={state['mlflow_tracking_uri']}"]


def stack_s3(state: dict):
    env = state["env"]
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def bucket_keys(state: dict, bucket: str, prefix: str = "") -> list[str]:
    pages = stack_s3(state).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.mark.slow
def test_the_local_stack_listens_on_loopback_only(stack):
    ports = {urllib.parse.urlsplit(url).port for url in
             (stack["mlflow_tracking_uri"], stack["ray_dashboard"], stack["env"]["AWS_ENDPOINT_URL"])}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
    assert {c.laddr.port for c in listening} == ports
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


def _finished_trials_in_s3(state: dict, sweep: str) -> int:
    client = stack_s3(state)
    done = 0
    for key in bucket_keys(state, state["buckets"]["ray"], f"runs/{sweep}/run_trial_"):
        if key.endswith("/result.json"):
            lines = client.get_object(Bucket=state["buckets"]["ray"], Key=key)["Body"].read().decode().strip().splitlines()
            done += bool(lines) and json.loads(lines[-1]).get("done", False)
    return done


@pytest.mark.slow
def test_a_sweep_on_the_stack_killed_mid_way_is_restored_by_a_ray_job_from_s3(sweep_project, stack, tmp_path):
    raw = yaml.safe_load((sweep_project / "params.yaml").read_text())
    # Two trials at a time: the third is in flight or pending when the driver dies after two.
    raw["tune"] |= {"name": "on-stack", "max_epochs": 2, "max_concurrent_trials": 2}
    raw["data"] |= {"prepared_dir": "data/prepared"}  # relative: found through --root
    (sweep_project / "on-stack.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sweep_args = ["pipeline/tune.py", "--root", str(sweep_project), "--params", "on-stack.yaml", *stack_overrides(stack)]
    env = stage_env() | stack["env"]

    # A driver on this machine joins the stack's cluster (RAY_ADDRESS) and is killed mid-sweep.
    driver = subprocess.Popen([sys.executable, str(ROOT / sweep_args[0]), *sweep_args[1:]], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _finished_trials_in_s3(stack, "on-stack") < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        kill_session(driver.pid)
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the sweep ended before it could be interrupted"
    assert _finished_trials_in_s3(stack, "on-stack") == 2

    # The same sweep submitted as a Ray job, with the code alone as its uploaded working dir.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    for package in ("pipeline", "resattn"):
        shutil.copytree(ROOT / package, job_dir / package, ignore=shutil.ignore_patterns("__pycache__"))
    submitted = subprocess.run(
        ["ray", "job", "submit", "--address", stack["ray_dashboard"], "--working-dir", str(job_dir), "--", "python",
         *sweep_args], env=env, capture_output=True, text=True, timeout=900)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    assert f"resuming sweep on-stack from s3://{stack['buckets']['ray']}/runs/on-stack" in submitted.stdout

    # Experiment state and checkpoints are in the bucket, not on the local disk.
    ray_keys = bucket_keys(stack, stack["buckets"]["ray"], "runs/")
    assert "runs/on-stack/tuner.pkl" in ray_keys
    assert any(key.startswith("runs/on-stack/experiment_state") for key in ray_keys)
    assert any(re.fullmatch(r"runs/on-stack-[^/]+/checkpoint_[^/]+/state\.pt", key) for key in ray_keys), ray_keys
    assert not (sweep_project / "ray_results" / "on-stack").exists()
    # MLflow artifacts went through the server into its bucket.
    artifact_keys = bucket_keys(stack, stack["buckets"]["mlflow"])
    assert any(key.endswith("/MLmodel") for key in artifact_keys)
    assert any(key.endswith("/sweep/trials.md") for key in artifact_keys)

    uri = stack["mlflow_tracking_uri"]
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("resattn-cifar10").experiment_id
    parent = client.search_runs([experiment_id], "tags.role = 'sweep' and tags.sweep = 'on-stack'")
    assert len(parent) == 1
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert len(children) == 3  # no trial lost, none started twice
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert len(steps) == len(set(steps)), (child.data.tags["trial_id"], steps)
    # The champion loads by alias through the server alone: no S3 credentials in this process.
    no_aws = {k: v for k, v in stage_env().items() if not k.startswith("AWS_")}
    loaded = subprocess.run(
        [sys.executable, "-c", "import mlflow, torch, sys; mlflow.set_tracking_uri(sys.argv[1]); "
         "model = mlflow.pytorch.load_model('models:/resattn-cifar10@champion'); "
         "print(tuple(model(torch.rand(3, 3, 32, 32)).shape))", uri],
        env=no_aws, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip().splitlines()[-1] == "(3, 10)"


@pytest.mark.parametrize("sweep_assignments", [[], ["profile=paper", "+model.overrides.p=2", "tune.num_samples=2"]])
def test_the_reproduce_line_composes_the_trial_params_under_any_profile(sweep_assignments):
    resolved = compose(sweep_assignments, ROOT / "params.yaml")
    settings = parse_params(resolved).tune
    sampled = {"model.overrides.r": 2, "train.optimizer.lr": 0.05}
    line = reproduce_command(resolved, sweep_assignments, sweep_layer(settings, sampled))
    assert line.startswith("dvc exp run -S ") and "tune." not in line
    if not sweep_assignments:
        assert line == ("dvc exp run -S train.epochs=3 -S train.num_workers=1 -S train.optimizer.lr=0.05 "
                        "-S +model.overrides.r=2")
    # What `dvc exp run` composes from the line is the trial's params, sweep settings aside.
    reproduced = compose(shlex.split(line)[4::2], ROOT / "params.yaml")
    trial = trial_raw(resolved, sampled, settings)
    assert {**reproduced, "tune": None} == {**trial, "tune": None}
    assert trial["train"]["epochs"] == settings.max_epochs and trial["train"]["optimizer"]["lr"] == 0.05
