"""Shared fixtures and helpers: small datasets in the real CIFAR-10 file format, free ports,
and ending exactly the processes a test started."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import psutil
import pytest

from resattn.cifar10 import Split, write_cifar_format

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "cifar-10-batches-py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session_processes(session_id: int) -> list[psutil.Process]:
    """The live processes of a session that a test started with start_new_session=True
    (zombies are dead already: they only wait for init to reap them)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


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
