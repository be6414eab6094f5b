"""The README's cluster commands, read from README.md and run as written against a real
`ray start` cluster: a sweep and the train stage submitted as Ray jobs join the cluster they run
in. Then the sweep's printed `dvc exp run` line, run in the same project, reproduces the best
trial's validation accuracy exactly (CPU training is deterministic)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ROOT, kill_session, run, stage_env, wait_for

pytestmark = pytest.mark.slow

# Small-data overrides appended to the README's sweep line, and nothing else.
SMALL_SWEEP = ["-S", "tune.num_samples=2", "-S", "tune.max_epochs=1"]
# Where `ray start --head` puts the dashboard agent that takes job submissions, by default.
RAY_AGENT_PORT = 52365


def readme_cluster_lines() -> list[str]:
    """The shell lines of the README's `ray start` ... `ray stop` block, continuations joined."""
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "ray start --head" in b)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_sweep_and_train_jobs_run_as_written_and_the_sweep_reproduces(project, exclusive_ray_ports, tmp_path):
    lines = readme_cluster_lines()
    assert lines[-1] == "ray stop" and any("pipeline/tune.py" in line for line in lines)
    assert any("python -m pipeline.train" in line for line in lines)
    # `ray stop` would end every Ray on this machine; the test ends the cluster it started instead.
    script = "set -e\n" + "\n".join(f"{line} {shlex.join(SMALL_SWEEP)}" if "pipeline/tune.py" in line else line
                                     for line in lines[:-1])
    started = time.time()
    log = tmp_path / "cluster.log"
    with open(log, "w") as out:
        cluster = subprocess.Popen(["bash", "-c", script], cwd=project, env=stage_env(), stdout=out,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{RAY_AGENT_PORT}/api/healthz", cluster, "the README cluster's job agent", log)
        exclusive_ray_ports()  # the agent holds its port: other tests may start their Rays again
        cluster.wait(timeout=1200)
    finally:
        kill_session(cluster.pid)  # the head's processes stay in the script's session
    try:
        check_jobs_and_reproduce(project, cluster.returncode, log.read_text())
    finally:
        # What `ray stop` would also do: forget this cluster as the machine's current one. Until
        # here, the stale record of a dead cluster was in place: the stages ignored it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.stat().st_mtime >= started:
            current.unlink()


def check_jobs_and_reproduce(project: Path, returncode: int, out: str) -> None:
    assert returncode == 0, out[-6000:]
    assert out.count("succeeded") >= 2, out[-4000:]
    assert "num_cpus and num_gpus must not be provided" not in out
    assert "1 worker(s) x 1 CPU thread(s)" in out  # a sweep trial
    assert "2 worker(s) x 1 CPU thread(s)" in out  # the train job

    summary = json.loads((project / "reports/tune/sweep/summary.json").read_text())
    assert summary["trials"] == 2
    reproduce = re.search(r"reproduce through the pipeline with:\n\s*(dvc exp run .*)", out).group(1)
    assert "-S train.epochs=1" in reproduce and "-S train.num_workers=1" in reproduce
    assert "tune." not in reproduce
    run(shlex.split(reproduce), project)
    trained = json.loads((project / "reports/train.json").read_text())
    assert trained["epochs"] == 1
    assert trained["val_accuracy"] == summary["val_accuracy"]
