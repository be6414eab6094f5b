"""The DVC pipeline for real: `dvc repro` in a temporary git repository, Ray Train on 2 CPU
workers, MLflow on sqlite, on a small dataset written in the real CIFAR-10 format."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import kill_session, synthetic_split
from resattn.cifar10 import write_cifar_format

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def stage_env() -> dict[str, str]:
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "DVC_NO_ANALYTICS": "1",
        # A test run lasts seconds: sample system metrics every second instead of every 10.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
    }
    env.pop("RESATTN_CIFAR10_SOURCE", None)
    return env


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = stage_env()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git + DVC repository holding the project and a small CIFAR-format dataset."""
    repo = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("pipeline", "resattn"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    source = repo.parent / f"{repo.name}-data" / "cifar-10-batches-py"
    checksums = write_cifar_format(source, synthetic_split(300, 0), synthetic_split(100, 1))
    md5_list = source.parent / "small.md5"
    md5_list.write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"] |= {"source": str(source), "checksums": str(md5_list), "validation_size": 60}
    params["model"] = {"preset": "attention56_tiny", "overrides": {}}
    params["train"] |= {"epochs": 2, "batch_size": 32, "label_smoothing": 0.0, "eval_batch_size": 100}
    params["train"]["schedule"] = {"name": "onecycle", "warmup_epochs": 0.5}
    params["evaluate"] |= {"mask_images": 3, "batch_size": 50}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], repo)
    return repo


def test_dvc_repro_runs_every_stage_registers_a_model_and_then_is_a_no_op(project):
    first = run(["dvc", "repro"], project)
    for stage in ("fetch", "preprocess", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    card = json.loads((project / "reports/data_card.json").read_text())
    assert (card["train"]["images"], card["val"]["images"], card["test"]["images"]) == (240, 60, 100)
    assert card["val"]["per_class"] == {cls: 6 for cls in card["val"]["per_class"]}
    register = json.loads((project / "reports/register.json").read_text())
    assert register["version"] == 1 and register["promoted"]
    with open(project / "reports/train_history.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2]
    for image in ("confusion.png", "attention_masks.png"):
        assert Image.open(project / "reports" / image).size[0] > 100

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.data.params["train.optimizer.name"] == "sgd"
    assert mlflow_run.data.params["model.preset"] == "attention56_tiny"
    assert {"git_commit", "data_hash", "seed"} <= set(mlflow_run.data.tags)
    assert mlflow_run.data.tags["data_hash"] != "unknown" or not (project / "dvc.lock").exists()
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
    assert "test_accuracy" in mlflow_run.data.metrics
    assert any(key.startswith("system/") for key in mlflow_run.data.metrics)

    second = run(["dvc", "repro"], project)
    assert "Running stage" not in second.stdout
    assert len(client.search_model_versions("name='resattn-cifar10'")) == 1


def test_champion_moves_only_on_improvement_and_predicts_image_files(project):
    if not (project / "reports/register.json").exists():
        run(["dvc", "repro"], project)
    evaluation = project / "reports/evaluate.json"
    original = json.loads(evaluation.read_text())
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("resattn-cifar10", "champion").version
    try:
        evaluation.write_text(json.dumps(original | {"test_accuracy": original["test_accuracy"] - 0.05}))
        run([sys.executable, "-m", "pipeline.register"], project)
        worse = json.loads((project / "reports/register.json").read_text())
        assert not worse["promoted"]
        assert client.get_model_version_by_alias("resattn-cifar10", "champion").version == champion

        evaluation.write_text(json.dumps(original | {"test_accuracy": original["test_accuracy"] + 0.05}))
        run([sys.executable, "-m", "pipeline.register"], project)
        better = json.loads((project / "reports/register.json").read_text())
        assert better["promoted"]
        assert int(client.get_model_version_by_alias("resattn-cifar10", "champion").version) == better["version"]
    finally:
        evaluation.write_text(json.dumps(original))

    images = synthetic_split(2, 5).images
    Image.fromarray(images[0]).save(project / "a.png")
    Image.fromarray(images[1]).resize((64, 48)).convert("L").save(project / "b.jpg")
    out = run([sys.executable, "-m", "pipeline.predict", "a.png", "b.jpg"], project).stdout.strip().splitlines()
    assert len(out) == 2
    for line, name in zip(out, ("a.png", "b.jpg")):
        path, label, probability = line.split("\t")
        assert path == name and label in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
        assert 0.0 < float(probability) <= 1.0
    (project / "not-an-image.png").write_text("hello")
    env = stage_env()
    bad = subprocess.run([sys.executable, "-m", "pipeline.predict", "not-an-image.png"], cwd=project,
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "not-an-image.png: not a readable image" in bad.stderr


def _train_history(project: Path) -> list[dict]:
    with open(project / "reports/train_history.csv") as f:
        return list(csv.DictReader(f))


def _recorded_epoch(storage: Path) -> int:
    """The latest epoch Ray Train has recorded as checkpointed (0 if none yet)."""
    snapshots = list(storage.glob("resume-*/checkpoint_manager_snapshot.json"))
    if not snapshots:
        return 0
    try:
        latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") or {}
    except json.JSONDecodeError:  # caught mid-write
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def test_an_interrupted_training_resumes_at_the_next_epoch_with_the_same_metrics(project):
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    epochs = 8
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = epochs
    params["ray"]["run_name"] = "resume"
    (project / "resume.yaml").write_text(yaml.safe_dump(params))
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", "resume.yaml"], cwd=project,
                              env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _recorded_epoch(project / "ray_results") == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_session(driver.pid)  # a crash: the driver, its Ray instance and the workers, at once
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "training ended before it could be interrupted"
    done = _recorded_epoch(project / "ray_results")
    assert 1 <= done < epochs

    resumed = run([sys.executable, "-m", "pipeline.train", "--params", "resume.yaml"], project).stdout
    assert f"resuming from the checkpoint of epoch {done}" in resumed
    assert all(f"epoch {e}/{epochs}:" not in resumed for e in range(1, done + 1))
    assert all(f"epoch {e}/{epochs}:" in resumed for e in range(done + 1, epochs + 1))
    interrupted = _train_history(project)
    assert [int(row["epoch"]) for row in interrupted] == list(range(1, epochs + 1))

    # Same seed and data, never interrupted: the same metrics, epoch for epoch.
    params["ray"]["run_name"] = "straight"
    (project / "straight.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "pipeline.train", "--params", "straight.yaml"], project)
    straight = _train_history(project)
    for a, b in zip(interrupted, straight, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), (key, a["epoch"])
