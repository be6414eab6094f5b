"""Elastic training on a real 3-node cluster on loopback (infra/local_stack.py: a head without
CPUs and two Ray nodes with one CPU each, S3 storage, an MLflow server): a run with
`train.num_workers: [1, 2]` grows into the second node, loses it mid-run and finishes every
epoch on the node left. A stack of its own: the run ends with a node gone, and an elastic run
started after others on the same cluster did not grow within minutes (RELIABILITY.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from helpers import ROOT, kill_session, params_variant, stage_env

pytestmark = pytest.mark.slow


def test_an_elastic_run_grows_into_a_second_node_and_finishes_on_one_when_that_node_is_lost(
        sweep_project, stack, tmp_path):
    """It takes one of the stack's nodes away for good: a stack of its own (this file's)."""
    params_file = params_variant(
        sweep_project, "elastic", train={"num_workers": [1, 2], "epochs": 8, "elastic_resize_seconds": 3},
        ray={"address": "auto", "storage_path": f"s3://{stack['buckets']['ray']}/runs", "run_name": "elastic"},
        mlflow={"tracking_uri": stack["mlflow_tracking_uri"]})
    log = tmp_path / "train.log"

    def wait_for_line(text: str, after: int = 0) -> int:
        """Where `text` first appears in the log after offset `after`, once it does."""
        deadline = time.monotonic() + 300
        while (found := log.read_text().find(text, after)) < 0:
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.5)
        return found

    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--params", params_file], cwd=sweep_project,
                                  env=stage_env() | stack["env"] | {"PYTHONPATH": str(ROOT)}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # It starts on what is free (a run before it may still hold a CPU), and grows to both nodes.
        both = wait_for_line("2 worker(s) x 1 CPU thread(s) on cpu, on 2 node(s)")
        wait_for_line("checkpoint saved for epoch", both)
        kill_session(stack["sessions"]["ray-node-2"])  # the node's raylet, its agents and its Train worker
        assert driver.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        kill_session(driver.pid)
    assert "1 worker(s) x 1 CPU thread(s) on cpu, on 1 node(s)" in log.read_text()[both:]  # on the node left
    assert json.loads((sweep_project / "reports/train.json").read_text())["epochs"] == 8
    client = MlflowClient(stack["mlflow_tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("resattn-cifar10").experiment_id],
                             "tags.ray_run LIKE 'elastic-%'")[0]
    # An epoch in flight at a restart is trained again and logged again: the later value counts.
    by_epoch = dict(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "workers")))
    assert sorted(by_epoch) == list(range(1, 9))  # every epoch, none lost
    workers = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    assert 2 in workers and workers[-1] == 1, workers
