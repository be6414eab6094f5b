"""Security, for real. Credentials stay where they are given: a whole `dvc repro` under fake
AWS keys and a data source carrying a password and a token, every output searched for them;
a source URL with credentials refused in params. What `predict` loads is what was registered
and runs no pickled code. A stage and its local Ray listen on loopback only."""

from __future__ import annotations

import pickle
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import boto3
import mlflow.artifacts
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import (
    LOOPBACK,
    ROOT,
    kill_session,
    listening_sockets,
    params_variant,
    params_yaml_with,
    run,
    serve_with_credentials,
    session_processes,
    shipped_params,
    stage_env,
    synthetic_split,
    wait_for_epoch,
)
from pipeline.config import parse_params
from pipeline.register import register_model
from pipeline.registry import record_digest
from resattn.data import STATS_FILE, save_split, write_json
from resattn.model import create_model
from resattn.model_file import save_model

PASSWORD, TOKEN = "Pa55w0rd-0f-alice", "t0ken-0f-alice"
ACCESS_KEY = "AKIAFAKEFAKEFAKEFAKE"
SECRET_KEY = "fake/Secret+Key0123456789abcdefghijklmnop"
SECRETS = (ACCESS_KEY, SECRET_KEY, PASSWORD, TOKEN)


def ray_session_logs(since: float) -> dict[str, str]:
    """The log files of every local Ray session started since `since` (this test's and any other
    test's running beside it: searching more costs nothing)."""
    logs = {}
    for session in Path(tempfile.gettempdir(), "ray").glob("session_2*"):
        if session.stat().st_mtime >= since:
            for path in (session / "logs").rglob("*"):
                if path.is_file():
                    logs[str(path)] = path.read_bytes().decode("latin-1")
    return logs


@pytest.mark.slow
def test_no_output_of_a_pipeline_run_contains_a_credential(project, s3_server, monkeypatch, tmp_path):
    """`dvc repro` from the fetch on, with AWS keys for checkpoints on an S3 server and a data
    source in the environment that carries a password and a token (served by a real HTTP server
    that demands both). Then every output is searched for each secret: the console, dvc.lock,
    the files the stages wrote, every object in the bucket, the MLflow runs' params, tags and
    metrics and every artifact (the registered model's files included), and Ray's session logs."""
    started = time.time()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # Ray's storage layer (pyarrow) reads this one
    boto3.session.Session().client("s3").create_bucket(Bucket="runs")
    project_params = yaml.safe_load((project / "params.yaml").read_text())
    source = Path(project_params["data"]["source"])
    tarball = tmp_path / "c.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    server = serve_with_credentials("alice", PASSWORD, f"/c.tar.gz?token={TOKEN}", tarball.read_bytes())
    url = f"http://alice:{PASSWORD}@127.0.0.1:{server.server_port}/c.tar.gz?token={TOKEN}"
    try:
        with params_yaml_with(project, train={"epochs": 2}, ray={"run_name": "secrets", "storage_path": "s3://runs/ray"}):
            result = subprocess.run(["dvc", "repro", "--force"], cwd=project, capture_output=True, text=True,
                                    env=stage_env() | {"RESATTN_CIFAR10_SOURCE": url}, timeout=900)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fetching CIFAR-10 from http://127.0.0.1:" in result.stdout  # from the environment's source

    outputs = {"stdout": result.stdout, "stderr": result.stderr, "dvc.lock": (project / "dvc.lock").read_text()}
    for path in [*(project / "reports").rglob("*"), *(project / "models").rglob("*")]:
        if path.is_file():
            outputs[str(path)] = path.read_bytes().decode("latin-1")
    client = boto3.session.Session().client("s3")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket="runs")["Contents"]]
    assert any(key.endswith("state.pt") for key in keys)  # the checkpoints did go to the bucket
    for key in keys:
        outputs[f"s3://runs/{key}"] = client.get_object(Bucket="runs", Key=key)["Body"].read().decode("latin-1")
    tracking_uri = f"sqlite:///{project / 'mlflow.db'}"
    tracking = MlflowClient(tracking_uri)
    experiment = tracking.get_experiment_by_name("resattn-cifar10")
    (secrets_run,) = tracking.search_runs([experiment.experiment_id], "tags.ray_run LIKE 'secrets-%'")
    outputs["mlflow run"] = repr((secrets_run.data.params, secrets_run.data.tags, sorted(secrets_run.data.metrics)))
    mlflow.set_tracking_uri(tracking_uri)
    downloaded = [Path(mlflow.artifacts.download_artifacts(run_id=secrets_run.info.run_id, dst_path=str(tmp_path / "run"))),
                  Path(mlflow.artifacts.download_artifacts(f"models:/{project_params['mlflow']['registered_model']}@champion",
                                                           dst_path=str(tmp_path / "model")))]
    for path in (path for folder in downloaded for path in folder.rglob("*") if path.is_file()):
        outputs[f"mlflow artifact {path}"] = path.read_bytes().decode("latin-1")
    assert any(name.endswith("MLmodel") for name in outputs)
    logs = ray_session_logs(started)
    assert any("raylet" in name for name in logs)
    outputs |= logs
    for name, text in outputs.items():
        for secret in SECRETS:
            assert secret not in text, (name, secret)


def test_a_source_url_with_credentials_is_refused_in_params_and_never_shown_from_the_environment(small_cifar,
                                                                                                  tmp_path):
    folder, md5_list = small_cifar
    tarball = tmp_path / "c.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    server = serve_with_credentials("alice", PASSWORD, f"/c.tar.gz?token={TOKEN}", tarball.read_bytes())
    url = f"http://alice:{PASSWORD}@127.0.0.1:{server.server_port}/c.tar.gz?token={TOKEN}"
    raw = shipped_params()
    raw["data"] |= {"checksums": str(md5_list), "raw_dir": str(tmp_path / "raw")}

    def fetch(source: str, in_environment: bool) -> subprocess.CompletedProcess:
        params = raw | {"data": raw["data"] | ({} if in_environment else {"source": source})}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        env = stage_env() | {"PYTHONPATH": str(ROOT)} | ({"RESATTN_CIFAR10_SOURCE": source} if in_environment else {})
        return subprocess.run([sys.executable, "-m", "pipeline.fetch"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    try:
        refused = fetch(url, in_environment=False)
        assert refused.returncode == 1
        assert "data.source: it carries credentials (user:password, token), and params are copied into dvc.lock" in \
            refused.stderr
        fetched = fetch(url, in_environment=True)
        assert fetched.returncode == 0, fetched.stderr[-3000:]
        assert f"fetching CIFAR-10 from http://127.0.0.1:{server.server_port}/c.tar.gz?token=***" in fetched.stdout
        assert (tmp_path / "raw/cifar-10-batches-py/data_batch_1").is_file()
        wrong = fetch(url.replace(PASSWORD, "wrong-" + PASSWORD).replace(TOKEN, "wrong-" + TOKEN), in_environment=True)
        assert wrong.returncode == 1 and "HTTP Error 401" in wrong.stderr
    finally:
        server.shutdown()
    for result in (refused, fetched, wrong):
        for text in (result.stdout, result.stderr):
            assert PASSWORD not in text and TOKEN not in text, text


class _CreatesFileWhenUnpickled:
    """What an attacker would put in a model file: unpickling it runs code (here, it only
    creates a file, which proves it ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.slow
def test_predict_loads_only_the_registered_files_and_never_unpickles(tmp_path, monkeypatch):
    """A model registered for real, then its files swapped in the artifact store: predict
    refuses them by digest; an attacker who also rewrote the digest meets MLflow's pickle
    refusal. The payload runs nowhere, though MLflow's own loader would run it."""
    monkeypatch.chdir(tmp_path)  # MLflow's local artifact root (./mlruns) goes here
    prepared = tmp_path / "data/prepared"
    save_split(prepared / "val.npz", synthetic_split(20, 3))
    write_json(prepared / STATS_FILE, {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    network = create_model("attention56_tiny")
    save_model(tmp_path / "model.pt", network.state_dict(), network.config, preset="attention56_tiny")
    raw = shipped_params()
    raw["mlflow"] |= {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    raw["data"] |= {"prepared_dir": str(prepared)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = parse_params(raw)
    client = MlflowClient(params.mlflow.tracking_uri)
    run_id = client.create_run(client.create_experiment("integrity")).info.run_id
    registration = register_model(params, tmp_path / "model.pt", run_id, 0.5)
    name, version = params.mlflow.registered_model, str(registration["version"])
    Image.fromarray(synthetic_split(1, 4).images[0]).save(tmp_path / "a.png")

    def predict() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.predict", "a.png"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=stage_env() | {"PYTHONPATH": str(ROOT)})

    trusted = predict()
    assert trusted.returncode == 0 and trusted.stdout.startswith("a.png\t"), trusted.stderr[-3000:]

    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    stored = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    marker = tmp_path / "payload-ran"
    (stored / "data/model.pt2").unlink()
    (stored / "data/model.pth").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    (stored / "data/pickle_module_info.txt").write_text("pickle")
    swapped = predict()
    assert swapped.returncode == 1
    assert f"{name} version {version}: its files in the artifact store are not those registered" in swapped.stderr
    assert not marker.exists()

    record_digest(client, name, version)  # the attacker rewrites the digest too
    redigested = predict()
    assert redigested.returncode == 1 and "Deserializing model using pickle is disallowed" in redigested.stderr
    assert not marker.exists()

    # What predict prevented: MLflow's loader, left to its defaults, runs the payload.
    subprocess.run([sys.executable, "-c", f"import mlflow.pytorch; mlflow.pytorch.load_model({str(stored)!r})"],
                   capture_output=True, timeout=300, env=stage_env())
    assert marker.exists()


@pytest.mark.slow
def test_a_training_stage_and_its_local_ray_listen_on_loopback_only(project, tmp_path):
    """Every listening socket of a training stage's processes (the driver, its local Ray's GCS,
    raylet, agents, Train controller and workers), taken while it trains: on loopback. By
    default Ray's listened on all interfaces or on the machine's address."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    params_file = params_variant(project, "loopback", train={"epochs": 3}, ray={"run_name": "loopback"})
    with open(tmp_path / "train.log", "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", params_file], cwd=project,
                                  env=stage_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_epoch(project, "loopback", 1, driver)
        sockets = listening_sockets(session_processes(driver.pid))
        assert driver.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        kill_session(driver.pid)
    assert any("gcs_server" in process for _, _, process in sockets), sockets  # Ray's own were seen
    exposed = [socket for socket in sockets if socket[0] not in LOOPBACK]
    # Bar one: torch.distributed's rendezvous store, which the rank-0 worker opens on all
    # interfaces whatever MASTER_ADDR says (torch has no setting for it; RELIABILITY.md).
    assert len(exposed) == 1 and exposed[0][0] in ("::", "0.0.0.0") and "RayTrainWorker" in exposed[0][2], sockets
