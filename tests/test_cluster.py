"""The cluster workflow on the local stack (infra/local_stack.py), all real processes on
127.0.0.1: a Ray head without CPUs and two more Ray nodes (each a raylet with a CPU of its own),
an MLflow server with S3 artifacts and an S3-compatible server. A sweep spreads its trials over
the nodes and, killed mid-way, is restored by a Ray job from S3; the train stage runs its
workers on two nodes, and refuses in one line what a multi-node cluster cannot run. When a node
is lost mid-run (`local_stack.py kill-node`), an elastic run goes on with the worker left, and a
fixed-size run waits until the node is back (`start-node`) and resumes."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import boto3
import psutil
import ray
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import (
    LOOPBACK,
    ROOT,
    free_port,
    kill_session,
    listening_sockets,
    local_stack,
    params_variant,
    session_processes,
    stage_env,
    train_on_the_stack,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("stack")
    command = [sys.executable, str(ROOT / "infra" / "local_stack.py")]
    # No CPU on the head: every Train worker runs on one of the two other nodes, one each.
    options = ["--dir", str(state_dir), "--num-cpus", "0", "--worker-nodes", "2", "--worker-node-cpus", "1"]
    for name in local_stack.PORTS:  # none of Ray's defaults: another Ray may hold them
        options += [f"--{name}-port", str(free_port())]
    up = subprocess.run(command + ["up"] + options, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-4000:]
    state = json.loads((state_dir / "stack.json").read_text())
    state["control"] = lambda action, *args: subprocess.run(
        command + [action, *args] + options, env=stage_env(), capture_output=True, text=True, timeout=300, check=True)
    try:
        yield state
    finally:
        sessions = json.loads((state_dir / "stack.json").read_text())["sessions"]  # a restarted node's too
        down = subprocess.run(command + ["down"] + options, env=stage_env(), capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        assert not any(session_processes(session) for session in sessions.values())
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


def test_the_local_stack_serves_on_loopback_and_exposes_only_rays_internal_ports(stack):
    """Every listening socket of every process the stack started. MLflow, the S3 server and the
    Ray dashboard (with the job API) are on loopback only. A multi-node Ray listens where other
    nodes reach it, on all interfaces or on the machine's address, by design (Ray's security
    guide: keep those ports behind a firewall; the stack turns on Ray's token authentication):
    every other socket belongs to a Ray process."""
    processes = [process for session in stack["sessions"].values() for process in session_processes(session)]
    sockets = listening_sockets(processes)
    services = {urllib.parse.urlsplit(url).port for url in
                (stack["mlflow_tracking_uri"], stack["ray_dashboard"], stack["env"]["AWS_ENDPOINT_URL"])}
    assert services <= {port for _, port, _ in sockets}, sockets
    assert all(address in LOOPBACK for address, port, _ in sockets if port in services), sockets
    exposed = [socket for socket in sockets if socket[0] not in LOOPBACK]
    ray_code = str(Path(ray.__file__).parent)
    assert all(process.startswith("ray::") or ray_code in process or " -m ray." in process for _, _, process in exposed), \
        exposed


def start_training(stack: dict, project: Path, params_file: str, log: Path) -> subprocess.Popen:
    """The train stage started in the background on the stack, its output going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", params_file], cwd=project,
                                env=stage_env() | stack["env"] | {"PYTHONPATH": str(ROOT)}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_line(log: Path, driver: subprocess.Popen, text: str, after: int = 0, timeout: float = 300) -> int:
    """Where `text` first appears in `log` after offset `after`, once it does (the driver running)."""
    deadline = time.monotonic() + timeout
    while (found := log.read_text().find(text, after)) < 0:
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.5)
    return found


def training_run(stack: dict, run_prefix: str):
    """The MLflow run of the training run whose Ray run name starts with `run_prefix`, or None."""
    client = MlflowClient(stack["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name("resattn-cifar10")
    runs = experiment and client.search_runs([experiment.experiment_id], f"tags.ray_run LIKE '{run_prefix}-%'")
    return runs[0] if runs else None


def epoch_metric(stack: dict, run_prefix: str, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of every value of `metric` logged to that run so far, in epoch order."""
    run = training_run(stack, run_prefix)
    history = MlflowClient(stack["mlflow_tracking_uri"]).get_metric_history(run.info.run_id, metric) if run else []
    return sorted((m.step, m.value) for m in history)


def wait_for_logged_epoch(stack: dict, run_prefix: str, driver: subprocess.Popen, metric: str, value: float) -> None:
    """Until the run has logged `metric` = `value` for an epoch: the controller logs an epoch
    once it has every worker's report and checkpoint, so a restart resumes after it."""
    deadline = time.monotonic() + 300
    while all(logged != value for _, logged in epoch_metric(stack, run_prefix, metric)):
        assert driver.poll() is None and time.monotonic() < deadline, f"no epoch with {metric} {value}"
        time.sleep(0.5)


# These two take a node away, and each leaves the stack whole again. They run first: an elastic
# run grows only into resources that no other run has reserved with Ray Train's
# AutoscalingCoordinator, and a run that dies without ending (a killed driver, a trial that
# ASHA stopped) keeps its reservation until it expires, 180 s later (RELIABILITY.md).


def test_an_elastic_run_grows_into_a_second_node_and_finishes_on_one_when_that_node_is_lost(
        sweep_project, stack, tmp_path):
    epochs = 8
    params_file = params_variant(
        sweep_project, "elastic", train={"num_workers": [1, 2], "epochs": epochs, "elastic_resize_seconds": 3},
        ray={"address": "auto", "storage_path": f"s3://{stack['buckets']['ray']}/runs", "run_name": "elastic"},
        mlflow={"tracking_uri": stack["mlflow_tracking_uri"]})
    log = tmp_path / "train.log"
    driver = start_training(stack, sweep_project, params_file, log)
    try:
        both = wait_for_line(log, driver, "2 worker(s) x 1 CPU thread(s) on cpu, on 2 node(s)")
        wait_for_logged_epoch(stack, "elastic", driver, "workers", 2)
        stack["control"]("kill-node", "--node", "2")  # its raylet, its agents and its Train worker
        try:
            assert driver.wait(timeout=600) == 0, log.read_text()[-5000:]
        finally:
            stack["control"]("start-node", "--node", "2")
    finally:
        kill_session(driver.pid)
    assert "1 worker(s) x 1 CPU thread(s) on cpu, on 1 node(s)" in log.read_text()[both:]  # on the node left
    assert json.loads((sweep_project / "reports/train.json").read_text())["epochs"] == epochs
    logged = epoch_metric(stack, "elastic", "workers")
    # Every epoch once: the one in flight when the node died is trained again, logged once.
    assert [epoch for epoch, _ in logged] == list(range(1, epochs + 1)), logged
    workers = [count for _, count in logged]
    assert 2 in workers and workers[-1] == 1, workers
    assert len(training_run(stack, "elastic").data.tags["ray_nodes"].split(",")) == 1  # the last group's


def test_a_fixed_size_run_waits_for_a_lost_node_and_resumes_when_it_returns(sweep_project, stack, tmp_path):
    epochs = 6
    params_file = params_variant(
        sweep_project, "fixed", train={"num_workers": 2, "epochs": epochs},
        ray={"address": "auto", "storage_path": f"s3://{stack['buckets']['ray']}/runs", "run_name": "fixed"},
        mlflow={"tracking_uri": stack["mlflow_tracking_uri"]})
    log = tmp_path / "train.log"
    driver = start_training(stack, sweep_project, params_file, log)
    try:
        wait_for_line(log, driver, "checkpoint saved for epoch 2")
        wait_for_logged_epoch(stack, "fixed", driver, "workers", 2)
        stack["control"]("kill-node", "--node", "2")
        lost = len(log.read_text())
        try:
            time.sleep(20)  # a fixed-size group needs both nodes: the run waits, it does not fail
            assert driver.poll() is None, log.read_text()[-5000:]
            assert "epoch 6/6" not in log.read_text()
        finally:
            stack["control"]("start-node", "--node", "2")
        assert driver.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        kill_session(driver.pid)
    after = log.read_text()[lost:]
    resumed = re.search(r"resuming from the checkpoint of epoch (\d+)", after)
    assert resumed and int(resumed.group(1)) >= 1, after[-5000:]
    assert "2 worker(s) x 1 CPU thread(s) on cpu, on 2 node(s)" in after[resumed.start():]
    assert json.loads((sweep_project / "reports/train.json").read_text())["epochs"] == epochs
    assert [epoch for epoch, _ in epoch_metric(stack, "fixed", "val_accuracy")] == list(range(1, epochs + 1))
    assert {count for _, count in epoch_metric(stack, "fixed", "workers")} == {2}


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
    # Two trials at a time on two nodes of one CPU each: the trials ran on both.
    assert len({child.data.tags["ray_nodes"] for child in children}) == 2
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
    assert [epoch for epoch, _ in epoch_metric(stack, "two-nodes", "val_accuracy")] == [1, 2]
    assert len(training_run(stack, "two-nodes").data.tags["ray_nodes"].split(",")) == 2
