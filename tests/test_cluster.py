"""The cluster workflow on the local stack (infra/local_stack.py), all real processes on
127.0.0.1: a Ray head and two more Ray nodes (each a raylet with a CPU of its own), an MLflow
server with S3 artifacts and an S3-compatible server. A sweep spreads its trials over the nodes
and, killed mid-way, is restored by a Ray job from S3; the train stage runs its workers on two
nodes, and refuses in one line what a multi-node cluster cannot run."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse

import boto3
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import ROOT, kill_session, params_variant, stage_env, train_on_the_stack

pytestmark = pytest.mark.slow




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


def test_the_train_stage_refuses_node_local_storage_or_tracking_on_a_multi_node_cluster(sweep_project, stack):
    storage = f"s3://{stack['buckets']['ray']}/runs"
    for name, ray_settings, mlflow_settings, expected in [
        ("local-storage", {"address": "auto"}, {"tracking_uri": stack["mlflow_tracking_uri"]},
         f"error: ray.storage_path '{sweep_project / 'ray_results'}' is a folder on each node, but the cluster at "),
        ("local-tracking", {"address": "auto", "storage_path": storage}, {},
         f"error: mlflow.tracking_uri sqlite:///{sweep_project / 'mlflow.db'} is a database on each node, but the "
         f"cluster at "),
    ]:
        result = train_on_the_stack(stack, sweep_project, params_variant(sweep_project, name, ray=ray_settings,
                                                                        mlflow=mlflow_settings))
        assert result.returncode == 1, (name, result.stdout[-2000:], result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(expected) and " has 3 nodes" in errors[0], result.stderr[-3000:]
        assert "epoch 1/" not in result.stdout  # refused before any training


def test_a_training_run_on_the_stack_puts_a_worker_on_each_of_two_nodes(sweep_project, stack):
    params_file = params_variant(
        sweep_project, "two-nodes", train={"num_workers": 2, "epochs": 2},
        ray={"address": "auto", "storage_path": f"s3://{stack['buckets']['ray']}/runs", "run_name": "two-nodes"},
        mlflow={"tracking_uri": stack["mlflow_tracking_uri"]})
    result = train_on_the_stack(stack, sweep_project, params_file)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 worker(s) x 1 CPU thread(s) on cpu, on 2 node(s)" in result.stdout, [
        line for line in result.stdout.splitlines() if "worker(s) x" in line]
    assert "epoch 2/2:" in result.stdout and (sweep_project / "models/model.pt").is_file()
    keys = bucket_keys(stack, stack["buckets"]["ray"], "runs/two-nodes-")
    assert any(re.fullmatch(r"runs/two-nodes-[^/]+/checkpoint_[^/]+/state\.pt", key) for key in keys), keys
    client = MlflowClient(stack["mlflow_tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("resattn-cifar10").experiment_id],
                             "tags.ray_run LIKE 'two-nodes-%'")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
