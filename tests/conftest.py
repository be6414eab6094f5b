"""Fixtures the tests share: small datasets in the real CIFAR-10 format, a real S3-compatible
server, a project in a temporary git + DVC repository and a prepared one for sweeps (plain
helpers: tests/helpers.py); and how the tests share the machine when pytest-xdist runs them in
parallel (pyproject.toml)."""

from __future__ import annotations

import collections
import fcntl
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, free_port, run, shipped_params, stage_env, synthetic_split
from resattn.cifar10 import write_cifar_format


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


# --------------------------------------------------------------------------------------------
# Running in parallel: pytest-xdist hands out whole files (`--dist loadfile`, pyproject.toml)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the most slow tests first, each in its own order: the longest files start
    first, so that the workers finish together."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


# Every Ray started on this machine binds its dashboard agent to port 52365 if that is free, a
# stage's local Ray included (ray.init has no setting for it), and a `ray start` cluster takes
# job submissions through that agent. While the README's cluster (test_readme.py) starts, as
# written, no other test may start a Ray: each test holds a shared lock, that one an exclusive
# one. A writer's turnstile keeps the shared holders, who follow each other without a gap, from
# starving it. The lock files are machine-wide, as the port is.
RAY_PORTS_LOCK = Path(tempfile.gettempdir()) / "resattn-tests-ray-ports.lock"
RAY_PORTS_TURNSTILE = Path(tempfile.gettempdir()) / "resattn-tests-ray-ports.turnstile"


def _locked(path: Path, mode: int):
    """`path` open with an flock in `mode`; closing the file releases it."""
    handle = open(path, "a")  # noqa: SIM115 - held past this function, closed by the caller
    fcntl.flock(handle, mode)
    return handle


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if "exclusive_ray_ports" in getattr(item, "fixturenames", ()):
        yield
        return
    with _locked(RAY_PORTS_TURNSTILE, fcntl.LOCK_SH):
        held = _locked(RAY_PORTS_LOCK, fcntl.LOCK_SH)
    with held:  # the whole test: its fixtures' set-up and teardown too
        yield


@pytest.fixture
def exclusive_ray_ports():
    """Ray's default ports to this test alone (no other test starts a Ray) until it calls the
    release function this yields, or ends."""
    with _locked(RAY_PORTS_TURNSTILE, fcntl.LOCK_EX):
        held = _locked(RAY_PORTS_LOCK, fcntl.LOCK_EX)
    with held:
        yield held.close


# --------------------------------------------------------------------------------------------
# A skipped test is a check that did not happen: the full-disk tests need root (to mount a
# tmpfs), one data test the real CIFAR-10 beside the project. Say so at the end, where no one
# misses it, not only in the one-letter "s" of the progress line.


@pytest.hookimpl(trylast=True)  # after the durations, just above the short summary and the totals
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} TEST(S) DID NOT RUN: what they check is unverified here", sep="!",
                             red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.line(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}", red=True, bold=True)
