"""Credentials stay where the AWS chain keeps them: a real training run with its checkpoints on
an S3-compatible server, under distinctive fake keys, and every output searched for them:
console, MLflow params, tags and metrics, the files the stage wrote, every object in the bucket."""

from __future__ import annotations

import subprocess
import sys

import boto3
import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import run, stage_env

pytestmark = pytest.mark.slow
ACCESS_KEY = "AKIAFAKEFAKEFAKEFAKE"
SECRET_KEY = "fake/Secret+Key0123456789abcdefghijklmnop"


def test_no_output_of_a_run_on_s3_contains_the_credentials(project, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # Ray's storage layer (pyarrow) reads this one
    boto3.session.Session().client("s3").create_bucket(Bucket="runs")
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"epochs": 2}
    params["ray"] |= {"run_name": "secrets", "storage_path": "s3://runs/ray"}
    (project / "secrets.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "secrets.yaml"], cwd=project,
                            env=stage_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    outputs = {"stdout": result.stdout, "stderr": result.stderr}
    for path in [*(project / "reports").rglob("*"), *(project / "models").rglob("*")]:
        if path.is_file():
            outputs[str(path)] = path.read_bytes().decode("latin-1")
    client = boto3.session.Session().client("s3")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="runs")["Contents"]]
    assert any(key.endswith("state.pt") for key in keys)  # the checkpoints did go to the bucket
    for key in keys:
        outputs[f"s3://runs/{key}"] = client.get_object(Bucket="runs", Key=key)["Body"].read().decode("latin-1")
    tracking = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = tracking.get_experiment_by_name("resattn-cifar10")
    for mlflow_run in tracking.search_runs([experiment.experiment_id], "tags.ray_run LIKE 'secrets-%'"):
        outputs[f"mlflow run {mlflow_run.info.run_id}"] = repr(
            (mlflow_run.data.params, mlflow_run.data.tags, sorted(mlflow_run.data.metrics)))
    assert len(outputs) > 10
    for name, text in outputs.items():
        assert ACCESS_KEY not in text and SECRET_KEY not in text, name
