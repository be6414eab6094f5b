"""Scale-out settings: bucket bootstrap on a real S3-compatible server, start-up checks that
fail in seconds with one clear message (bad credentials, missing bucket, dead endpoint, no
tracking server), and the deployment files in infra/ checked against the repository."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import boto3
import pytest
import yaml

from helpers import BIN, ROOT, free_port, infra_module, serve_with_credentials, wait_for
from pipeline.config import ConfigError, load_params, parse_params, resolve
from pipeline.remote import check_run_services, check_s3_location, check_tracking_server, redact

bootstrap = infra_module("bootstrap")
FAKE_SECRET = "fake-secret-that-must-never-be-printed"


def pinned(package: str) -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in dependencies if re.match(rf"{package}(\[.*\])?==", d))


# --------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_creates_configured_buckets_idempotently(s3_server, capsys):
    for _ in range(2):  # the second run must change nothing and not fail
        bootstrap.main(["--prefix", "acme-resattn", "--checkpoint-days", "14"])
    out = capsys.readouterr().out
    client = boto3.client("s3")
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert names == {"acme-resattn-data", "acme-resattn-mlflow", "acme-resattn-ray"}
    assert client.get_bucket_versioning(Bucket="acme-resattn-data")["Status"] == "Enabled"
    rules = {r["ID"]: r for r in client.get_bucket_lifecycle_configuration(Bucket="acme-resattn-ray")["Rules"]}
    assert rules["expire-old-checkpoints"]["Expiration"]["Days"] == 14
    assert "abort-incomplete-uploads" in rules
    for name in names:
        block = client.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
        assert all(block.values())
        encryption = client.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]
        assert encryption["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert "dvc remote add -d storage s3://acme-resattn-data/dvc" in out
    assert f"dvc remote modify storage endpointurl {s3_server}" in out
    assert "ray.storage_path: s3://acme-resattn-ray/runs" in out
    policy, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    resources = json.dumps(policy)
    assert "acme-resattn-ray" in resources and "acme-resattn-mlflow" not in resources


@pytest.mark.parametrize("prefix", ["Acme", "a", "-acme", "acme_resattn", "x" * 56])
def test_bootstrap_refuses_prefixes_that_cannot_name_a_bucket(prefix, capsys):
    with pytest.raises(SystemExit):
        bootstrap.main(["--prefix", prefix])
    assert "--prefix" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Start-up checks


def test_a_missing_bucket_is_named_with_the_fix(s3_server):
    with pytest.raises(ConfigError) as error:
        check_s3_location("ray.storage_path", "s3://no-such-bucket/runs")
    assert str(error.value) == (
        f"ray.storage_path s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist at {s3_server}; "
        "create it with `python infra/bootstrap.py` or fix the bucket name")


def test_an_existing_bucket_passes(s3_server):
    boto3.client("s3").create_bucket(Bucket="runs")
    check_s3_location("ray.storage_path", "s3://runs/prefix")


def test_a_dead_endpoint_fails_in_seconds(monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        check_s3_location("ray.storage_path", "s3://bucket/runs")
    assert f"cannot reach the S3 endpoint {dead}" in str(error.value)
    assert time.monotonic() - started < 60
    assert FAKE_SECRET not in str(error.value)


def test_missing_credentials_say_where_they_come_from(monkeypatch, tmp_path, s3_server):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError) as error:
        check_s3_location("ray.storage_path", "s3://bucket/runs")
    assert "no AWS credentials found; provide them through the standard AWS chain" in str(error.value)


@pytest.fixture
def s3_server_checking_credentials(monkeypatch, tmp_path):
    """moto's server with authentication on: it knows no access key, so every key is wrong."""
    port = free_port()
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env={"PATH": str(BIN), "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(endpoint, server, "moto", tmp_path / "no.log")
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKEFAKE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_rejected_credentials_are_one_clear_error_without_the_secret(s3_server_checking_credentials):
    with pytest.raises(ConfigError) as error:
        check_s3_location("ray.storage_path", "s3://bucket/runs")
    message = str(error.value)
    assert f"{s3_server_checking_credentials} refused the credentials for bucket 'bucket' (HTTP 403)" in message
    assert FAKE_SECRET not in message and "AKIAFAKE" not in message


def test_a_tracking_server_behind_a_password_is_reached_and_never_named_with_it(monkeypatch):
    """A server that answers /health only with the password, as MLflow behind basic
    authentication does: the check sends the URI's user:password (or MLflow's own variables)
    as MLflow would, and no message ever shows the password."""
    password = "hunter2-of-alice"
    server = serve_with_credentials("alice", password, "/health", b"OK")
    address = f"127.0.0.1:{server.server_port}"
    try:
        check_tracking_server(f"http://alice:{password}@{address}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        check_tracking_server(f"http://{address}")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        messages = []
        for uri in (f"http://alice:wrong-{password}@{address}", f"http://{address}"):
            with pytest.raises(ConfigError) as error:
                check_tracking_server(uri)
            messages.append(str(error.value))
        assert messages[0] == (f"mlflow.tracking_uri http://{address}: the server answered HTTP 401 to /health; check "
                               f"its credentials (user:password in the URI, or MLFLOW_TRACKING_USERNAME and "
                               f"MLFLOW_TRACKING_PASSWORD)")
    finally:
        server.shutdown()
    unreachable = f"http://alice:{password}@127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError) as error:
        check_tracking_server(unreachable)
    messages.append(str(error.value))
    assert "the MLflow server is unreachable ([Errno 111] Connection refused)" in messages[-1]
    for message in messages:
        assert password not in message, message
    assert redact("s3://bucket/key") == "s3://bucket/key"


def test_local_stores_need_no_checks():
    check_run_services(parse_params({}))  # sqlite tracking, local storage: nothing to reach


def test_the_train_stage_stops_before_ray_on_a_missing_bucket(s3_server, tmp_path):
    """One line on stderr, exit 1, within seconds, and no Ray started."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"ray": {"storage_path": "s3://missing/runs"}}))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=tmp_path, capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: ray.storage_path s3://missing/runs: bucket 'missing' does not exist at {s3_server}; "
        "create it with `python infra/bootstrap.py` or fix the bucket name"]
    assert result.stdout == "" and time.monotonic() - started < 60


def test_overrides_read_like_dvc_exp_run_set(tmp_path):
    own = tmp_path / "own.yaml"  # a file other than params.yaml takes -S on its own values, as in DVC
    own.write_text(yaml.safe_dump({"train": {"epochs": 1}, "ray": {"address": None}}))
    assert resolve(own, ["train.epochs=3", "ray.address=auto", "+train.use_gpu=true",
                         "+mlflow.tracking_uri=http://127.0.0.1:5000"]) == {
        "train": {"epochs": 3, "use_gpu": True}, "ray": {"address": "auto"},
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000"}}
    for bad in ("train.epochs", "=3", "train..epochs=3"):
        with pytest.raises(ConfigError, match="is not KEY=VALUE"):
            resolve(own, [bad])


# --------------------------------------------------------------------------------------------
# infra/ files against the repository


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_infra_file_parses():
    for path in (ROOT / "infra").rglob("*.yaml"):
        assert yaml_documents(path), path


def test_images_are_built_from_the_pinned_ray_and_mlflow():
    ray_version, mlflow_version = pinned("ray"), pinned("mlflow")
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_version)}-py311-gpu$", dockerfile, re.M)
    for copied in re.findall(r"^COPY \S+ (.+?) \S+$", dockerfile, re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name
    assert f"mlflow=={mlflow_version}" in (ROOT / "infra/docker/mlflow.Dockerfile").read_text()
    images = [(ROOT / "infra/aws/cluster.yaml").read_text()] + [p.read_text() for p in (ROOT / "infra/k8s").glob("*.yaml")]
    ray_images = re.findall(r"image: (\S+/resattn:\S+)", "\n".join(images))
    assert ray_images and all(image.endswith(f"ray{ray_version}-py311-gpu") for image in ray_images)


def test_the_aws_cluster_autoscales_gpu_workers_from_zero():
    cluster = yaml_documents(ROOT / "infra/aws/cluster.yaml")[0]
    gpu = cluster["available_node_types"]["gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert "GPU" not in cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    for node in cluster["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]  # S3 through the role, not keys
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])


def test_the_kuberay_cluster_asks_for_gpus_on_workers_only():
    cluster = yaml_documents(ROOT / "infra/k8s/raycluster.yaml")[0]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["rayVersion"] == pinned("ray")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    workers = cluster["spec"]["workerGroupSpecs"]
    assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for w in workers)


def test_the_rayjob_runs_existing_entry_points_with_valid_params():
    job = yaml_documents(ROOT / "infra/k8s/rayjob.yaml")[0]
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == yaml_documents(ROOT / "infra/k8s/raycluster.yaml")[0]["metadata"]["name"]
    script = shlex.split(job["spec"]["entrypoint"])[2]  # bash -c "<script>"
    commands = [shlex.split(part) for part in script.split("&&")]
    modules = [c[2] for c in commands if c[:2] == ["python", "-m"]]
    assert modules == ["pipeline.fetch", "pipeline.preprocess"]
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
    tune = next(c for c in commands if c[:2] == ["python", "pipeline/tune.py"])
    assert (ROOT / tune[1]).is_file()
    params = load_params(ROOT / "params.yaml", [value for flag, value in zip(tune[2::2], tune[3::2]) if flag == "-S"])
    assert params.train.use_gpu and params.ray.storage_path.startswith("s3://")
    assert params.mlflow.tracking_uri == "http://mlflow.resattn.svc:5000"
    source = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["RESATTN_CIFAR10_SOURCE"]
    assert source.startswith("s3://")


def test_the_training_rayjob_writes_valid_elastic_params_and_runs_every_stage():
    job = yaml_documents(ROOT / "infra/k8s/rayjob-train.yaml")[0]
    assert job["spec"]["clusterSelector"] == yaml_documents(ROOT / "infra/k8s/rayjob.yaml")[0]["spec"]["clusterSelector"]
    script = shlex.split(job["spec"]["entrypoint"])[2]  # bash -c "<script>"
    commands = [shlex.split(part) for part in script.split("&&")]
    assert [c[2] for c in commands[1:]] == [f"pipeline.{stage}" for stage in
                                           ("config", "fetch", "preprocess", "train", "evaluate", "register")]
    write = commands[1]
    assert write[3] == "--write"
    params = load_params(ROOT / "params.yaml", [value for flag, value in zip(write[4::2], write[5::2]) if flag == "-S"])
    assert params.model.preset == "attention92" and params.train.use_gpu
    assert params.train.worker_range == (1, 4) and params.train.batch_size == 384
    assert params.ray.storage_path.startswith("s3://") and params.mlflow.tracking_uri.startswith("http://")


def test_the_mlflow_server_keeps_artifacts_on_s3_and_its_password_in_a_secret():
    deployment, service = yaml_documents(ROOT / "infra/k8s/mlflow.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["args"])
    assert "--artifacts-destination=s3://" in args and "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
    assert service["spec"]["type"] == "ClusterIP"


def test_no_credentials_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    access_key = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    # A secret key is 40 characters of base64 assigned to something that names it.
    secret_key = re.compile(r"secret_access_key\W{1,4}[A-Za-z0-9/+]{40}\b", re.IGNORECASE)
    for name in tracked:
        path = ROOT / name
        if path.is_file() and path.suffix in {".py", ".yaml", ".yml", ".md", ".toml", ".cfg", ".txt", ""}:
            text = path.read_text(errors="replace").replace("AKIAFAKEFAKEFAKEFAKE", "")
            assert not access_key.search(text) and not secret_key.search(text), name
