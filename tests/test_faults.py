"""Fault injection, for real: a Ray Train worker SIGKILLed mid-epoch, checkpoints truncated on
disk, a preprocess killed mid-write, a tracking server that is not there, SIGTERM to a stage,
to its whole process group or to the `dvc repro` over it. Each test asserts
what a user relies on afterwards: the run finishes with the metrics it would have had, or
stops with one message naming what is wrong, and nothing half-written is ever taken as valid.
(Sweeps killed and restored are in test_tune.py and test_cluster.py.)"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from helpers import (
    ROOT,
    MlflowServer,
    free_port,
    kill_session,
    params_yaml_with,
    recorded_checkpoint,
    recorded_epoch,
    run,
    session_processes,
    stage_env,
    wait_for_epoch,
)
from resattn.cifar10 import DataError, fetch, read_md5_list
from resattn.data import write_json

pytestmark = pytest.mark.slow
EPOCHS = 6


def history(project: Path) -> list[dict]:
    with open(project / "reports/train_history.csv") as f:
        return list(csv.DictReader(f))


def write_params(project: Path, run_name: str, **train) -> str:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"epochs": EPOCHS} | train
    params["ray"]["run_name"] = run_name
    (project / f"{run_name}.yaml").write_text(yaml.safe_dump(params))
    return f"{run_name}.yaml"


def start_training(project: Path, params_file: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", params_file], cwd=project,
                                env=stage_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted(project) -> list[dict]:
    """The reference: the same params, seed and data, never interrupted."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    run([sys.executable, "-m", "pipeline.train", "--params", write_params(project, "reference")], project)
    return history(project)


def assert_same_metrics(resumed: list[dict], reference: list[dict]) -> None:
    assert [int(row["epoch"]) for row in resumed] == list(range(1, EPOCHS + 1))
    for a, b in zip(resumed, reference, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            # Resuming at an epoch boundary replays the same shuffles, augmentations and
            # weights: equal up to float summation order (1e-6 relative).
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), (key, a["epoch"])


def test_a_worker_killed_mid_epoch_restarts_from_the_latest_checkpoint(project, uninterrupted, tmp_path):
    log = tmp_path / "train.log"
    driver = start_training(project, write_params(project, "worker-kill"), log)
    try:
        wait_for_epoch(project, "worker-kill", 2, driver)
        workers = [p for p in session_processes(driver.pid) if " ".join(p.cmdline()).startswith("ray::RayTrainWorker")]
        assert workers, "no Ray Train worker found"
        workers[-1].send_signal(signal.SIGKILL)  # in the epoch after the checkpoint of epoch 2
        killed_at = recorded_epoch(project / "ray_results", "worker-kill")
        assert driver.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        kill_session(driver.pid)
    out = log.read_text()
    assert killed_at < EPOCHS
    # The group restarts from the newest checkpoint: only the epoch in flight is redone.
    assert f"resuming from the checkpoint of epoch {killed_at}" in out, out[-5000:]
    assert_same_metrics(history(project), uninterrupted)


def checkpoint_files(project: Path, run_name: str) -> list[Path]:
    return sorted((project / "ray_results").glob(f"{run_name}-*/checkpoint_*/state.pt"))


@pytest.fixture(scope="module")
def interrupted_run(project, tmp_path_factory) -> tuple[str, Path, Path]:
    """(params file, run folder, a copy of it) of a run whose driver was killed, with its Ray
    and workers, after the checkpoint of epoch 3: each test damages its own copy."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    params_file = write_params(project, "interrupted")
    driver = start_training(project, params_file, tmp_path_factory.mktemp("interrupted") / "first.log")
    try:
        wait_for_epoch(project, "interrupted", 3, driver)
    finally:
        kill_session(driver.pid)
        driver.wait(timeout=60)
    (folder,) = (project / "ray_results").glob("interrupted-*")
    pristine = tmp_path_factory.mktemp("pristine") / folder.name
    shutil.copytree(folder, pristine)
    return params_file, folder, pristine


def restored(interrupted_run: tuple[str, Path, Path]) -> tuple[str, list[Path], Path]:
    """The interrupted run as it was killed: (params file, its checkpoint files, the one
    Ray Train resumes from)."""
    params_file, folder, pristine = interrupted_run
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    latest = recorded_checkpoint(folder.parent, "interrupted") / "state.pt"
    return params_file, sorted(folder.glob("checkpoint_*/state.pt")), latest


def test_a_truncated_latest_checkpoint_is_skipped_for_the_one_before(project, uninterrupted, interrupted_run):
    params_file, files, latest = restored(interrupted_run)
    assert [f for f in files if f < latest]  # one kept before it
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    resumed = run([sys.executable, "-m", "pipeline.train", "--params", params_file], project).stdout
    assert f"warning: checkpoint {latest} is unreadable (RuntimeError: " in resumed
    assert "resuming from the checkpoint of epoch" in resumed
    assert_same_metrics(history(project), uninterrupted)


def test_when_no_checkpoint_loads_the_error_names_every_file(project, interrupted_run):
    params_file, files, latest = restored(interrupted_run)
    files = [f for f in files if f <= latest]  # the ones resume may use
    assert files
    for path in files:
        path.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", params_file], cwd=project,
                            env=stage_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    error = errors[0]
    assert error.startswith("error: training run interrupted-") and "no readable checkpoint to resume from" in error
    for path in files:
        assert str(path) in error
        assert path.read_bytes() == b"not a checkpoint"  # evidence kept, nothing overwritten


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def folder_arrays(folder: Path) -> dict[str, list]:
    """What a prepared folder holds, as arrays (np.savez stamps each write with the time)."""
    held = {}
    for path in sorted(folder.iterdir()):
        with np.load(path) if path.suffix == ".npz" else contextlib.nullcontext(None) as archive:
            held[path.name] = [archive[key].tolist() for key in archive.files] if archive else path.read_text()
    return held


def staging_folders(parent: Path) -> set[str]:
    return {entry.path for entry in os.scandir(parent)
            if entry.name.startswith(".prepared-staging-") and not entry.name.endswith("-retired")}


def stopped_while_staging(process: subprocess.Popen, parent: Path, delay: float, stale: set[str]) -> list[str] | None:
    """SIGSTOP `process` `delay` seconds after its own staging folder (not one of the `stale`
    folders a killed run left) appears in `parent`, and return what the folder then held; None
    if the process ended or swapped first."""
    while process.poll() is None:
        staging = sorted(staging_folders(parent) - stale)
        if staging:
            time.sleep(delay)
            os.kill(process.pid, signal.SIGSTOP)
            try:
                return sorted(os.listdir(staging[0]))
            except FileNotFoundError:
                return None  # swapped in before the stop
    return None


def test_a_preprocess_killed_mid_write_leaves_the_previous_prepared_data_byte_for_byte(project):
    """Kills landed at known points: each stops the stage while its staging folder is being
    written (a file half-written in it, seen), then SIGKILLs it. The previous folder stays byte for
    byte, and the next run writes what a clean run writes."""
    run(["dvc", "repro", "fetch"], project)
    run([sys.executable, "-m", "pipeline.preprocess"], project)
    prepared = project / "data" / "prepared"
    before_bytes, before_arrays = folder_bytes(prepared), folder_arrays(prepared)
    seen = []
    for attempt in range(40):
        stale = staging_folders(prepared.parent)
        process = subprocess.Popen([sys.executable, "-m", "pipeline.preprocess"], cwd=project, env=stage_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            held = stopped_while_staging(process, prepared.parent, 0.001 * (attempt % 6), stale)
        finally:
            kill_session(process.pid)
            process.wait(timeout=60)
        if held is None:
            continue
        seen.append(held)
        assert folder_bytes(prepared) == before_bytes, held  # not a byte of the previous folder touched
        if sum(any(name.startswith(".") for name in held) for held in seen) >= 3:
            break
    mid_write = [held for held in seen if any(name.startswith(".") for name in held)]  # a temp file being written
    assert len(mid_write) >= 3, f"kills did not land while a file was being written: {seen}"
    run([sys.executable, "-m", "pipeline.preprocess"], project)
    assert folder_arrays(prepared) == before_arrays
    assert not list(prepared.parent.glob(".prepared-staging-*"))  # the killed runs' leftovers are gone


def test_an_unreachable_tracking_server_stops_training_before_it_starts(project, tmp_path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    (project / "no-server.yaml").write_text(yaml.safe_dump(params))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "no-server.yaml"], cwd=project,
                            env=stage_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: mlflow.tracking_uri {params['mlflow']['tracking_uri']}: the MLflow server is unreachable "
        "([Errno 111] Connection refused); start it (python infra/local_stack.py up, for a local one) or fix the URI"]
    assert time.monotonic() - started < 60 and result.stdout == ""  # no run opened, no Ray started


def test_a_tracking_server_lost_mid_run_costs_no_training_and_the_rerun_logs_the_rest(project, tmp_path):
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    server = MlflowServer(tmp_path)
    server.start()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"epochs": EPOCHS}
    params["ray"]["run_name"] = "outage"
    params["mlflow"]["tracking_uri"] = server.uri
    (project / "outage.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "pipeline.train", "--params", "outage.yaml"]
    env = stage_env() | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # fail fast once the server is gone
    try:
        with open(tmp_path / "train.log", "w") as out:
            driver = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            wait_for_epoch(project, "outage", 1, driver)
            server.stop()
            assert driver.wait(timeout=600) == 1
        finally:
            kill_session(driver.pid)
        out = (tmp_path / "train.log").read_text()
        assert "could not log epoch" in out and "training goes on" in out
        assert f"epoch {EPOCHS}/{EPOCHS}:" in out  # every epoch trained despite the outage
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: training finished and models/model.pt is saved, but MLflow at {server.uri} did not take")
        assert (project / "models/model.pt").is_file() and checkpoint_files(project, "outage")

        server.start()
        again = run(command, project).stdout
        assert "epoch 1/" not in again and "had already concluded; nothing to train" in again  # no Ray at all
        assert "epoch metric values that MLflow had missed" in again
        assert "fit_seconds" not in json.loads((project / "reports/train.json").read_text())  # it trained nothing
        client = MlflowClient(server.uri)
        mlflow_run = client.search_runs([client.get_experiment_by_name("resattn-cifar10").experiment_id],
                                        "tags.ray_run LIKE 'outage-%'")[0]
        steps = [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "val_accuracy")]
        assert sorted(steps) == list(range(1, EPOCHS + 1))  # each epoch once
    finally:
        server.stop()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 16 MiB filesystem (tmpfs) that a test can fill to the last byte."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(filesystem: Path) -> Path:
    """Write zeros until the filesystem refuses: ENOSPC, for real."""
    filler = filesystem / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_fetching_onto_a_full_disk_says_so_and_leaves_nothing(small_filesystem, small_cifar):
    folder, md5_list = small_cifar
    raw = small_filesystem / "raw"
    raw.mkdir()
    filler = fill(small_filesystem)
    with pytest.raises(DataError) as error:
        fetch(str(folder), raw / "cifar-10-batches-py", read_md5_list(md5_list))
    assert str(error.value).startswith(f"no space left on the disk of {raw} (0 MB free; CIFAR-10 needs about 180 MB")
    assert "data.raw_dir" in str(error.value)
    assert list(raw.iterdir()) == []  # no partial folder left
    filler.unlink()


def test_outputs_on_a_full_disk_fail_clearly_and_keep_the_previous_file(small_filesystem):
    target = small_filesystem / "reports" / "evaluate.json"
    write_json(target, {"test_accuracy": 0.5})
    filler = fill(small_filesystem)
    with pytest.raises(OSError) as error:
        write_json(target, {"test_accuracy": 0.9, "padding": "x" * 1_000_000})
    assert error.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"test_accuracy": 0.5}
    assert sorted(p.name for p in target.parent.iterdir()) == ["evaluate.json"]  # no temp file left
    filler.unlink()


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint_and_resumes(project, small_filesystem, tmp_path):
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"] |= {"epochs": EPOCHS, "max_failures": 1}
    params["ray"] |= {"run_name": "disk-full", "storage_path": str(small_filesystem / "runs")}
    (project / "disk-full.yaml").write_text(yaml.safe_dump(params))
    driver = start_training(project, "disk-full.yaml", tmp_path / "train.log")
    try:
        wait_for_epoch(small_filesystem, "disk-full", 1, driver, storage="runs")
        filler = fill(small_filesystem)
        assert driver.wait(timeout=600) == 1
    finally:
        kill_session(driver.pid)
    errors = [line for line in (tmp_path / "train.log").read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    error = errors[0]
    assert error.startswith("error: training run disk-full-") and "No space left on device" in error, error
    saved = sorted((small_filesystem / "runs").glob("disk-full-*/checkpoint_*/state.pt"))
    assert saved
    state = torch.load(saved[0], map_location="cpu", weights_only=True)  # still whole and loadable
    assert state["epoch"] >= 0

    filler.unlink()  # space again: the rerun resumes from that checkpoint
    resumed = run([sys.executable, "-m", "pipeline.train", "--params", "disk-full.yaml"], project).stdout
    assert "resuming from the checkpoint of epoch" in resumed
    assert [int(row["epoch"]) for row in history(project)] == list(range(1, EPOCHS + 1))


def params_yaml_for(project: Path, run_name: str):
    """The project's params.yaml training EPOCHS epochs as `run_name`, put back afterwards."""
    return params_yaml_with(project, train={"epochs": EPOCHS}, ray={"run_name": run_name})


def wait_until_session_is_empty(session: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while (left := [" ".join(p.cmdline())[:80] for p in session_processes(session)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"still running {timeout:.0f} s after SIGTERM: {left}"


def sigterm_at_epoch_two(command: list[str], project: Path, run_name: str, env: dict[str, str], log: Path,
                         epochs: int = EPOCHS, to_group: bool = False) -> int:
    """Start `command` in a session of its own, send SIGTERM to that one process (or, with
    `to_group`, to every process of its group) once epoch 2 is checkpointed, and return the last
    epoch checkpointed, after checking that nothing of the session is left, that training did
    not run to its end of `epochs` and, for the driver alone, that the stage said it stopped (a
    raylet signalled with it may die first, and Ray's core worker then ends the driver at once)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        wait_for_epoch(project, run_name, 2, process)
        if to_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
        wait_until_session_is_empty(process.pid)
    finally:
        kill_session(process.pid)
    text = log.read_text()
    assert to_group or "stopped (SIGTERM or Ctrl-C); rerun the same command to resume" in text, text[-3000:]
    done = recorded_epoch(project / "ray_results", run_name)
    assert 2 <= done < epochs, done
    return done


def test_sigterm_stops_the_train_driver_with_its_ray_and_a_rerun_resumes(project, tmp_path):
    """What a scheduler or `kill` sends, to the driver alone: the stage, its local Ray and the
    workers all stop (nothing outlives it), and the next run resumes from the last checkpoint."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    with params_yaml_for(project, "sigterm"):
        done = sigterm_at_epoch_two([sys.executable, "-m", "pipeline.train"], project, "sigterm", stage_env(),
                                    tmp_path / "run.log")
        # Not `dvc repro`: a finished run enters DVC's run cache, and the next test's would not train.
        again = run([sys.executable, "-m", "pipeline.train"], project).stdout
        assert f"resuming from the checkpoint of epoch {done}" in again
        assert f"epoch {EPOCHS}/{EPOCHS}:" in again


def test_sigterm_to_the_train_drivers_whole_process_group_stops_training_within_epochs(project, tmp_path):
    """`kill -- -<pgid>`, or a batch scheduler that signals every process of a job: the local
    Ray's GCS and raylet get SIGTERM beside the driver and stop answering, and the workers train
    on until the driver has stopped the raylet. That took 7 s, 10 test epochs, while the driver
    waited to send task events to the stopped GCS; now 2. The rerun resumes."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    epochs = 16
    with params_yaml_with(project, train={"epochs": epochs}, ray={"run_name": "group-sigterm"}):
        done = sigterm_at_epoch_two([sys.executable, "-m", "pipeline.train"], project, "group-sigterm", stage_env(),
                                    tmp_path / "run.log", epochs=epochs, to_group=True)
        assert done <= 2 + 5, f"epoch {done} was checkpointed after SIGTERM at epoch 2"
        again = run([sys.executable, "-m", "pipeline.train"], project).stdout
        assert f"resuming from the checkpoint of epoch {done}" in again
        assert f"epoch {epochs}/{epochs}:" in again


def test_sigterm_to_a_sweeps_whole_process_group_stops_it_and_the_rerun_finishes_it(sweep_project, tmp_path):
    """The same signal to `python pipeline/tune.py`'s group: at exit, Tune's handler that
    unregisters the sweep's trainables asked the signalled GCS, which never answered, and the
    driver, its GCS and its trial workers were all still there a minute later. The driver now
    exits within seconds, nothing of the sweep outlives it, and the same command finishes the
    sweep (once in five reruns, before 78f635b, Tune's record pointed at a checkpoint Train had
    since deleted)."""
    command = [sys.executable, str(ROOT / "pipeline" / "tune.py"), "-S", "tune.name=group-sigterm",
               "-S", "tune.num_samples=2"]
    experiment = sweep_project / "ray_results" / "group-sigterm"
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(command, cwd=sweep_project, env=stage_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(experiment.glob("run_trial_*")):
            assert driver.poll() is None, "the sweep ended before it could be signalled"
            assert time.monotonic() < deadline, "no trial started within 5 minutes"
            time.sleep(0.1)
        time.sleep(2)  # into the trial's training
        os.killpg(driver.pid, signal.SIGTERM)
        driver.wait(timeout=60)
        # Within the default 90 s, not 30: in one run a Ray worker that was starting as the
        # signal came was still there 30 s later.
        wait_until_session_is_empty(driver.pid)
    finally:
        kill_session(driver.pid)
    assert driver.returncode != 0, log.read_text()[-3000:]

    run(command, sweep_project)
    summary = json.loads((sweep_project / "reports/tune/group-sigterm/summary.json").read_text())
    assert summary["trials"] == 2, summary


def test_a_sweep_killed_as_a_trial_concludes_has_that_trial_whole_when_restored(sweep_project):
    """Tune saves its record of the trials every 10 s at most, Train a checkpoint every epoch: a
    sweep killed just after a trial's Train run concluded is restored with a record from before
    the trial's last results. The restored trial, with nothing left to train, reported nothing,
    and the sweep went on with the stale record: a result of an earlier epoch, or none, or one
    whose checkpoint Train had since deleted. It now reports its final result again."""
    command = [sys.executable, str(ROOT / "pipeline" / "tune.py"), "-S", "tune.name=concluded",
               "-S", "tune.num_samples=1"]
    driver = subprocess.Popen(command, cwd=sweep_project, env=stage_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while recorded_epoch(sweep_project / "ray_results", "concluded") < 3:  # the sweep's tune.max_epochs
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the trial did not conclude within 5 minutes"
            time.sleep(0.02)  # not wait_for_epoch's 0.05 s: at that pace the old code passed a run
    finally:
        kill_session(driver.pid)
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"

    run(command, sweep_project)
    summary = json.loads((sweep_project / "reports/tune/concluded/summary.json").read_text())
    assert (summary["trials"], summary["trial_epochs"], summary["stopped_early"]) == (1, 3, 0), summary


def test_sigterm_to_dvc_repro_alone_stops_its_stage_and_ray(project, tmp_path):
    """`kill <dvc pid>`: DVC dies at once and does not pass the signal on. The stage, DVC's
    child, asked Linux for SIGTERM on its parent's death, and stops with its Ray. Run with
    SHELL unset, as in cron, CI and `env -i`: DVC then runs the stage through /bin/sh (dash),
    which, without the `exec` in dvc.yaml, stayed the stage's parent, and the stage trained on
    to its last epoch."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    env = stage_env()
    env.pop("SHELL", None)
    with params_yaml_for(project, "repro-sigterm"):
        sigterm_at_epoch_two(["dvc", "repro", "train"], project, "repro-sigterm", env, tmp_path / "repro.log")


def test_a_killed_dvc_repro_resumes_training_when_rerun(project, uninterrupted, tmp_path):
    """The same, one level up: `dvc repro` killed (with its stage, its Ray and the workers)."""
    with params_yaml_for(project, "repro-kill"):
        with open(tmp_path / "repro.log", "w") as out:
            driver = subprocess.Popen(["dvc", "repro", "train"], cwd=project, env=stage_env(), stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_epoch(project, "repro-kill", 2, driver)
        finally:
            kill_session(driver.pid)
            driver.wait(timeout=60)
        done = recorded_epoch(project / "ray_results", "repro-kill")
        assert 2 <= done < EPOCHS
        again = run(["dvc", "repro", "train"], project).stdout
        assert f"resuming from the checkpoint of epoch {done}" in again
        assert all(f"epoch {e}/{EPOCHS}:" not in again for e in range(1, done + 1))
        assert_same_metrics(history(project), uninterrupted)


# Someone else's Ray on the machine, started by `ray.init()` (no `ray start` record of it to go by).
ANOTHER_LOCAL_RAY = """
import sys
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False)  # its own, whatever `ray start` runs here
print("up", flush=True)
sys.stdin.readline()
print(ray.get(ray.put(41)) + 1, flush=True)
"""


def test_training_beside_another_local_ray_works_and_leaves_that_ray_running(project):
    """Two local Rays on one machine. Train V2's placement-group cleaner asks Ray's state API,
    which, not told which Ray, looked for "the" Ray of the machine, found two, and ended the
    cleaner with a ConnectionError traceback ("Found multiple active Ray instances"): seen here
    with both of the stage's pointers to its own Ray removed (cluster.py, ray_hooks.py)."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    other = subprocess.Popen([sys.executable, "-c", ANOTHER_LOCAL_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=stage_env(), start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"
        result = run([sys.executable, "-m", "pipeline.train", "--params", write_params(project, "beside", epochs=2)],
                     project)
        console = result.stdout + result.stderr
        assert "epoch 2/2:" in console
        for complaint in ("multiple active Ray instances", "Failed to query Ray Train Controller actor state"):
            assert complaint not in console, console[-3000:]
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "42"  # the other Ray was neither joined nor harmed
    finally:
        kill_session(other.pid)
        other.wait(timeout=60)
