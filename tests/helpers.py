"""Plain helpers the tests share (conftest.py holds the fixtures): paths, small datasets in the
real CIFAR-10 file format, stages run as a user runs them, the infra/ scripts, and ending
exactly the processes a test started."""

from __future__ import annotations

import base64
import contextlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import psutil
import yaml

from pipeline.cluster import free_port  # noqa: F401 - shared with the tests
from resattn.cifar10 import Split

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_CIFAR10 = ROOT.parent / "shared" / "cifar-10-batches-py"


def infra_module(name: str) -> ModuleType:
    """A script of infra/ (scripts, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "infra" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


local_stack = infra_module("local_stack")
session_processes = local_stack.session_processes
wait_for = local_stack.wait_for


def shipped_params() -> dict:
    """The committed params.yaml, as a mapping."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


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


def stage_env() -> dict[str, str]:
    """The environment stages run in: this venv first on PATH, no data source override."""
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "DVC_NO_ANALYTICS": "1",
        # A test run lasts seconds: sample system metrics every second instead of every 10.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
        # A test epoch lasts a second, and Ray Train takes one report per worker-group poll,
        # every 2 s: a 6-epoch run took 38.5 s with that and 29.5 s polling every 0.5 s.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    env.pop("RESATTN_CIFAR10_SOURCE", None)
    return env


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command as a user would, in `cwd`; fail the test with its output if it fails."""
    result = subprocess.run(args, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


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


@contextlib.contextmanager
def params_yaml_with(project: Path, **sections: dict) -> Iterator[None]:
    """`project`'s params.yaml (what `dvc repro` reads) with `sections` updated, put back as it
    was afterwards."""
    original = (project / "params.yaml").read_text()
    raw = yaml.safe_load(original)
    for section, values in sections.items():
        raw[section] |= values
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        yield
    finally:
        (project / "params.yaml").write_text(original)


def wait_for_epoch(root: Path, run_name: str, epoch: int, driver: subprocess.Popen, storage: str = "ray_results") -> None:
    """Until Ray Train has recorded `epoch`'s checkpoint of `run_name`, while `driver` runs."""
    deadline = time.monotonic() + 300
    while recorded_epoch(root / storage, run_name) < epoch:
        assert driver.poll() is None, "training ended before the fault could be injected"
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)


def params_variant(project: Path, name: str, **sections: dict) -> str:
    """`project`'s params.yaml with `sections` updated, written as <name>.yaml; its file name."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        raw[section] |= values
    (project / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return f"{name}.yaml"


def train_on_the_stack(stack: dict, project: Path, params_file: str) -> subprocess.CompletedProcess:
    """The train stage run in `project` with the local stack's settings in its environment."""
    return subprocess.run([sys.executable, "-m", "pipeline.train", "--params", params_file], cwd=project,
                          env=stage_env() | stack["env"] | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 that a test can stop and start again (same store)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=stage_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(f"{self.uri}/health", self.process, "the MLflow server", self.root / "no.log")

    def stop(self) -> None:
        if self.process is not None:
            kill_session(self.process.pid)
            self.process.wait(timeout=60)
            self.process = None


def serve_with_credentials(user: str, password: str, path: str, body: bytes) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 that answers GET `path` (query included) with `body` only to
    `user` with `password` (HTTP basic authentication), and anything else with 401."""
    login = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            allowed = self.headers.get("Authorization") == login and self.path == path
            answer = body if allowed else b"no"
            self.send_response(200 if allowed else 401)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_sockets(processes: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process) of every TCP socket the `processes` listen on."""
    names = {}
    for process in processes:
        try:
            names[process.pid] = " ".join(process.cmdline())[:120] or process.name()
        except psutil.NoSuchProcess:
            pass
    return sorted((c.laddr.ip, c.laddr.port, names[c.pid]) for c in psutil.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in names)
