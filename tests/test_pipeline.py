"""The DVC pipeline for real: `dvc repro` in a temporary git repository, Ray Train on 2 CPU
workers, MLflow on sqlite, on a small dataset written in the real CIFAR-10 format."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers import ROOT, params_variant, recorded_checkpoint, run, stage_env, synthetic_split
from pipeline import ray_hooks
from resattn.data import load_prepared, to_tensor_nchw
from resattn.model_file import load_model
from resattn.training import autocast_dtype, evaluate, precision_name

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_every_stage_registers_a_model_and_then_is_a_no_op(project):
    first = run(["dvc", "repro"], project)
    for stage in ("fetch", "preprocess", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    console = first.stdout + first.stderr
    assert "epoch 2/2: train loss" in console  # the workers' progress reaches the console
    assert "2 worker(s) x 1 CPU thread(s) on cpu, on 1 node(s)" in console  # each runs the CPUs Ray gave it
    # A person reads this: no escape codes in a pipe, no Ray or MLflow chatter at INFO.
    assert "\x1b[" not in console
    for chatter in ("Reporting training result", "Started a local Ray instance", "Token authentication is enabled",
                    "INFO mlflow", "Setting up process group", "Downloading artifacts"):
        assert chatter not in console, chatter
    # The local Ray runs without its dashboard, and Train V2's placement-group cleaner, which
    # asks the dashboard every second whether the controller lives, does not complain of it.
    assert "Failed to query Ray Train Controller actor state" not in console
    card = json.loads((project / "reports/data_card.json").read_text())
    assert (card["train"]["images"], card["val"]["images"], card["test"]["images"]) == (240, 60, 100)
    assert card["val"]["per_class"] == {cls: 6 for cls in card["val"]["per_class"]}
    register = json.loads((project / "reports/register.json").read_text())
    assert register["version"] == 1 and register["promoted"]
    evaluation = json.loads((project / "reports/evaluate.json").read_text())
    assert evaluation["precision"] == precision_name(autocast_dtype(torch.device("cpu"), True))  # as validation scores
    with open(project / "reports/train_history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in history] == [1, 2]
    assert 0 < float(history[0]["training_minutes"]) < float(history[1]["training_minutes"])  # time to accuracy
    for image in ("confusion.png", "attention_masks.png"):
        assert Image.open(project / "reports" / image).size[0] > 100

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.data.params["train.optimizer.name"] == "sgd"
    assert mlflow_run.data.params["model.preset"] == "attention56_tiny"
    assert {"mlflow.source.git.commit", "mlflow.source.name", "seed", "profile"} <= set(mlflow_run.data.tags)
    (dataset,) = [d.dataset for d in mlflow_run.inputs.dataset_inputs]  # the Dataset column
    assert dataset.name == "cifar10-prepared" and len(dataset.digest) == 32
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


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_dvc_push_then_pull_into_a_clean_clone_restores_the_data_bit_for_bit(project, s3_server, tmp_path):
    if not (project / "dvc.lock").exists():
        run(["dvc", "repro", "preprocess"], project)
    boto3.client("s3").create_bucket(Bucket="team-resattn-data")
    # What `python infra/bootstrap.py` prints for an S3-compatible endpoint.
    run(["dvc", "remote", "add", "-d", "storage", "s3://team-resattn-data/dvc"], project)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_server], project)
    run(["git", "add", "dvc.lock", ".dvc/config"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data on the remote"], project)
    pushed = run(["dvc", "push"], project)
    assert "pushed" in pushed.stdout

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data").exists()
    run(["dvc", "pull", "fetch", "preprocess"], clone)
    for folder in ("data/raw", "data/prepared"):
        original, pulled = _file_bytes(project / folder), _file_bytes(clone / folder)
        assert original and pulled == original, folder


def test_a_diverging_run_stops_with_one_line_and_leaves_no_model(project):
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["optimizer"]["lr"] = 1e30  # finite, so valid; the first update wrecks the weights
    params["ray"]["run_name"] = "diverge"
    (project / "diverge.yaml").write_text(yaml.safe_dump(params))
    (project / "models").mkdir(exist_ok=True)
    (project / "models/model.pt").write_bytes(b"a model from an earlier run")
    for attempt in ("first", "rerun"):
        result = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", "diverge.yaml"], cwd=project,
                                env=stage_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 1, (attempt, result.stdout[-3000:], result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.match(r"error: the training loss became nan at epoch 1, step 2 of \d+;", errors[0]), errors[0]
        assert not (project / "models/model.pt").exists()
        assert "epoch 1/2: train loss" not in result.stdout
        assert ("had already concluded" in result.stdout) == (attempt == "rerun")  # the rerun starts no Ray
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    failed = client.search_runs([client.get_experiment_by_name("resattn-cifar10").experiment_id],
                                "tags.ray_run LIKE 'diverge-%'")
    assert [r.info.status for r in failed] == ["FAILED"]


# Run in a local Ray of the train stage: Train V2's controller configures logging as it starts
# (after the stage's worker set-up hook), then each logger the stage keeps quiet there logs a
# warning and an error. Printed: what reached the `ray.train` handlers, which the console is.
CONTROLLER_CONSOLE = """
import json, logging
import ray
from pipeline import ray_hooks
from pipeline.cluster import RAY_TRAIN_LOGGING, start_ray
from pipeline.config import load_params

@ray.remote
def controller_console():
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.train.v2._internal.execution.context import TrainRunContext
    from ray.train.v2._internal.logging.logging import LoggingManager

    LoggingManager.configure_controller_logger(TrainRunContext(
        run_config=RunConfig(logging_config=RAY_TRAIN_LOGGING), train_loop_config=None,
        scaling_config=ScalingConfig(), backend_config=TorchConfig(), dataset_config=DataConfig()))
    console = []
    handler = logging.Handler()
    handler.emit = lambda record: console.append(f"{record.name}: {record.getMessage()}")
    logging.getLogger("ray.train").addHandler(handler)
    for name in (ray_hooks.AUTOSCALING_CLIENT_LOGGER, ray_hooks.PLACEMENT_GROUP_CLEANER_LOGGER):
        logging.getLogger(name).warning("a warning")
        logging.getLogger(name).error("an error")
    return console

start_ray(load_params())
print(json.dumps(ray.get(controller_console.remote())))
"""


def test_the_warnings_a_local_run_silences_stay_silent_once_train_configures_its_logging():
    """The autoscaling client's "safe to ignore" traceback, printed when the machine is busy,
    once broke the one-line error of a diverging run: Train's controller had reset the level
    the stage set. Errors still get through."""
    result = subprocess.run([sys.executable, "-c", CONTROLLER_CONSOLE], cwd=ROOT, env=stage_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    console = json.loads(result.stdout.strip().splitlines()[-1])
    assert console == [f"{ray_hooks.AUTOSCALING_CLIENT_LOGGER}: an error",
                       f"{ray_hooks.PLACEMENT_GROUP_CLEANER_LOGGER}: an error"], console


def test_the_validation_a_two_worker_run_reports_is_the_model_files(project):
    """Each worker validates its half of the split; the figure must be that of the weights the
    model file keeps. DDP hands rank 0's batch-norm statistics to the others only at the start of
    a training step, so after its last step each worker held statistics moved by its own last
    batch: a 2-worker run on CIFAR-10 reported 92.44% for a model file that scores 92.62%."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    train = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert train["num_workers"] == 2
    variant = params_variant(project, "fp32", ray={"run_name": "fp32"}, train=train | {"mixed_precision": False})
    run([sys.executable, "-m", "pipeline.train", "--params", variant], project)
    reported = json.loads((project / "reports/train.json").read_text())
    (_, val, norm), _ = load_prepared(project / "data/prepared")
    scored = evaluate(load_model(project / "models/model.pt"), to_tensor_nchw(val.images),
                      torch.from_numpy(val.labels), norm, batch_size=train["eval_batch_size"])
    assert reported["val_loss"] == pytest.approx(scored.loss, rel=1e-5)
    assert reported["val_accuracy"] == pytest.approx(scored.accuracy, abs=1e-9)


def test_a_run_with_a_weight_average_validates_and_keeps_the_average(project):
    """The time-to-accuracy tricks through the real worker loop: the moving average of the
    weights (BN statistics too) is checkpointed with the run and is what the model file holds;
    alternating flip, BN momentum, the BN-and-bias learning rate, progressive resizing (the
    first of the two epochs at 16 px) and validation only every other epoch run alongside."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    train = yaml.safe_load((project / "params.yaml").read_text())["train"]
    variant = params_variant(project, "averaged", ray={"run_name": "averaged"},
                             train=train | {"ema_decay": 0.9, "alternating_flip": True, "bn_momentum": 0.3,
                                            "optimizer": train["optimizer"] | {"norm_and_bias_lr_multiplier": 4.0},
                                            "progressive_resizing": {"start_size": 16, "full_size_at": 0.5},
                                            "validate_every": 2})
    (project / "models").mkdir(exist_ok=True)
    result = run([sys.executable, "-m", "pipeline.train", "--params", variant], project)
    state = torch.load(recorded_checkpoint(project / "ray_results", "averaged") / "state.pt", weights_only=True)
    assert int(state["weight_average"]["n_averaged"]) == 2 * (240 // 32)  # one update per step of both epochs
    assert [epoch["image_size"] for epoch in state["history"]] == [16, 32]
    # The first epoch is not validated: no figure for it anywhere, and a line that says why.
    assert "epoch 1/2: train loss" in result.stdout and "validated every 2 epochs" in result.stdout
    assert ["val_accuracy" in epoch for epoch in state["history"]] == [False, True]
    # Beside the average, the weights it averages are scored too: what the average buys, in one run.
    assert 0 <= state["history"][1]["val_accuracy_unaveraged"] <= 1 and "(unaveraged weights " in result.stdout
    with open(project / "reports/train_history.csv") as f:
        assert [row["val_accuracy"] == "nan" for row in csv.DictReader(f)] == [True, False]  # which DVC plots skip
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [2]
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy_unaveraged")] == [2]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    kept = torch.load(project / "models/model.pt", weights_only=True)["model"]
    assert kept.keys() == state["model"].keys()
    differs = [key for key in kept if not torch.equal(kept[key], state["model"][key])]
    assert any(key.endswith("running_mean") for key in differs) and any(key.endswith("weight") for key in differs)
    for key in kept:
        assert torch.equal(kept[key], state["weight_average"][f"module.{key}"]), key
    load_model(project / "models/model.pt")  # the file rebuilds its model


def test_a_time_budget_trains_the_epochs_it_measured_would_fit_and_keeps_that_count(project):
    """`train.minutes`: the worker group measures its step at every image side, trains the most
    epochs, up to train.epochs, that fit, and says so (the log, the MLflow run, the checkpoint);
    a rerun finds the run concluded at that count, where train.epochs names more."""
    if not (project / "data/prepared/train.npz").exists():
        run(["dvc", "repro", "preprocess"], project)
    train = yaml.safe_load((project / "params.yaml").read_text())["train"]
    cap, minutes = 200, 0.2
    variant = params_variant(project, "budget", ray={"run_name": "budget"},
                             train=train | {"epochs": cap, "minutes": minutes, "validate_every": 3,
                                            "schedule": {"name": "onecycle", "warmup_epochs": 1.0},
                                            "progressive_resizing": {"start_size": 24, "full_size_at": 0.5}})
    result = run([sys.executable, "-m", "pipeline.train", "--params", variant], project)
    assert "time budget 0.2 min: measuring the training step at 24, 28, 32 px and a validation" in result.stdout
    chosen = re.search(rf"time budget 0.2 min: (\d+) of at most {cap} epochs fit, planned at ([\d.]+) min",
                       result.stdout)
    assert chosen, result.stdout
    assert 2 <= int(chosen[1]) < cap and float(chosen[2]) <= minutes  # the schedule's fewest (past warm-up), and room
    # The first epoch, all warm-up, trains alike for any count: its own time corrects the count.
    corrected = re.search(r"time budget 0.2 min: epoch 1 trained at \d+ img/s at 24 px against \d+ measured: (\d+) "
                          r"epochs, planned at ([\d.]+) min\n", result.stdout)
    assert corrected, result.stdout
    epochs, planned = int(corrected[1]), float(corrected[2])
    assert 2 <= epochs < cap and (planned <= minutes or epochs == 2)  # or the fewest, were the epoch far slower
    state = torch.load(recorded_checkpoint(project / "ray_results", "budget") / "state.pt", weights_only=True)
    assert state["epochs"] == epochs and len(state["history"]) == epochs
    assert f"epoch {epochs}/{epochs}: train loss" in result.stdout
    # The ramp was planned for the chosen count: its first half at 24 and 28 px, then 32.
    sides = [epoch["image_size"] for epoch in state["history"]]
    assert sides[0] == 24 and sides == sorted(sides) and abs(sides.index(32) - epochs / 2) <= 0.5
    assert json.loads((project / "reports/train.json").read_text())["epochs"] == epochs
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    mlflow_run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(run_id)
    assert mlflow_run.data.tags["epochs"] == str(epochs) and mlflow_run.data.params["train.minutes"] == "0.2"
    again = run([sys.executable, "-m", "pipeline.train", "--params", variant], project)
    assert "had already concluded; nothing to train" in again.stdout
