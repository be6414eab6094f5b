"""Shared fixtures and helpers: small datasets in the real CIFAR-10 file format, a project
in a temporary git + DVC repository, free ports, and ending exactly the processes a test
started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from pipeline.train import free_port  # noqa: F401 - shared with the tests
from resattn.cifar10 import Split, write_cifar_format

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_CIFAR10 = ROOT.parent / "shared" / "cifar-10-batches-py"
sys.path.insert(0, str(ROOT / "infra"))  # infra/ holds scripts, not a package
from local_stack import session_processes  # noqa: E402


def kill_session(session_id: int) -> None:
    """SIGKILL a session's processes at once, like a crash: the driver, its Ray, the workers."""
    for process in session_processes(session_id):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def synthetic_split(n: int, seed: int) -> Split:
    """Images whose mean colour depends on the class, so a tiny net can learn something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    base = (labels[:, None, None, None] * 25).astype(np.int16)
    noise = rng.integers(-20, 21, size=(n, 32, 32, 3))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64))


@pytest.fixture
def small_cifar(tmp_path: Path) -> tuple[Path, Path]:
    """(folder, md5 list) of a 400/100-image dataset in the official format."""
    folder = tmp_path / "source" / "cifar-10-batches-py"
    checksums = write_cifar_format(folder, synthetic_split(400, 0), synthetic_split(100, 1))
    md5_list = tmp_path / "source" / "small.md5"
    md5_list.write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))
    return folder, md5_list


@pytest.fixture
def s3_server(monkeypatch) -> str:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1, with fake credentials in the
    environment the way the standard AWS chain reads them; returns its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in process memory across servers: start each test empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield endpoint
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# A project in a temporary git + DVC repository, with stages run as a user runs them


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
    """A fresh git + DVC repository holding the project and a small CIFAR-format dataset (set in
    its conf/config.yaml, composed into params.yaml)."""
    repo = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("pipeline", "resattn", "conf"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    source = repo.parent / f"{repo.name}-data" / "cifar-10-batches-py"
    checksums = write_cifar_format(source, synthetic_split(300, 0), synthetic_split(100, 1))
    md5_list = source.parent / "small.md5"
    md5_list.write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))

    config = yaml.safe_load((repo / "conf/config.yaml").read_text())
    config["data"] |= {"source": str(source), "checksums": str(md5_list), "validation_size": 60}
    config["model"] = {"preset": "attention56_tiny", "overrides": {}}
    config["train"] |= {"epochs": 2, "batch_size": 32, "label_smoothing": 0.0, "eval_batch_size": 100}
    config["train"]["schedule"] = {"name": "onecycle", "warmup_epochs": 0.5}
    config["evaluate"] |= {"mask_images": 3, "batch_size": 50}
    (repo / "conf/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc/config", repo / ".dvc/config")  # Hydra composition, as the project has it
    run([sys.executable, "-m", "pipeline.config", "--write"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"], repo)
    return repo


def _latest_recorded(storage: Path, run_name: str) -> dict:
    snapshots = list(storage.glob(f"{run_name}-*/checkpoint_manager_snapshot.json"))
    if not snapshots:
        return {}
    try:
        latest = json.loads(snapshots[0].read_text()).get("latest_checkpoint_result") or {}
    except json.JSONDecodeError:  # caught mid-write
        return {}
    return latest | {"run_dir": snapshots[0].parent}


def recorded_epoch(storage: Path, run_name: str) -> int:
    """The latest epoch Ray Train has recorded as checkpointed for a run (0 if none yet)."""
    return int(_latest_recorded(storage, run_name).get("metrics", {}).get("epoch", 0))


def recorded_checkpoint(storage: Path, run_name: str) -> Path:
    """The folder of the checkpoint Ray Train resumes from (a newer one may be half-registered)."""
    latest = _latest_recorded(storage, run_name)
    return latest["run_dir"] / latest["checkpoint_dir_name"]
