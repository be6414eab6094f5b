"""The GPU check (benchmarks/gpu_check.py) runs as the device machine runs it, on the CPU here:
pack a prepared dataset into the one file that travels, then measure from that file with a
tiny model; and pack a profile's recipe with the whole dataset in parts, then train it from
them. Each in a clean environment with the repository's code alone on the path."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import ROOT, stage_env, synthetic_split
from resattn.data import STATS_FILE, channel_stats, save_split, write_json
from resattn.training import cpu_has_native_bf16


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A preprocess stage's output: 96 training and 40 test images."""
    folder = tmp_path / "prepared"
    train, test = synthetic_split(96, 0), synthetic_split(40, 1)
    save_split(folder / "train.npz", train)
    save_split(folder / "test.npz", test)
    mean, std = channel_stats(train.images)
    write_json(folder / STATS_FILE, {"mean": mean, "std": std})
    return folder


@pytest.fixture
def check(tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """benchmarks/gpu_check.py with these arguments, as the device machine runs it."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=tmp_path,
                              env=stage_env(), capture_output=True, text=True, timeout=600)
    return run


def test_the_gpu_check_packs_its_data_and_reports_every_figure(tmp_path, prepared, check):
    packed = tmp_path / "gpu_check.npz"

    packing = check("pack", "--prepared", str(prepared), "--out", str(packed), "--train-images", "80",
                    "--test-images", "30")
    assert packing.returncode == 0, packing.stderr[-3000:]
    assert "80 training and 30 test images" in packing.stdout
    too_many = check("pack", "--prepared", str(prepared), "--out", str(tmp_path / "x.npz"), "--train-images", "500")
    assert too_many.returncode == 1 and "has 96 training and 40 test images; asked for 500" in too_many.stderr

    report_file = tmp_path / "out" / "gpu_check.json"
    measured = check("run", "--data", str(packed), "--device", "cpu", "--preset", "attention56_tiny",
                     "--batch-size", "16", "--steps", "2", "--warmup-steps", "1", "--accuracy-epochs", "1",
                     "--modes", "eager fp32", "channels_last + mixed precision", "--out", str(report_file))
    assert measured.returncode == 0, measured.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert [mode["mode"] for mode in report["modes"]] == ["eager fp32", "channels_last + mixed precision"]
    mixed = "bfloat16" if cpu_has_native_bf16() else "float32"  # an AVX2 CPU would emulate bf16: fp32
    assert [mode["precision"] for mode in report["modes"]] == ["float32", mixed]
    assert all(mode["img_per_s"] > 0 and mode["host_syncs_per_step"] is None for mode in report["modes"])
    accuracy = report["accuracy"]
    assert (accuracy["train_images"], accuracy["test_images"], accuracy["epochs"]) == (80, 30, 1)
    assert 0.0 <= accuracy["test_accuracy"] <= 1.0
    assert report["data"] == "80 CIFAR-10 training and 30 test images (gpu_check.npz)"
    assert "accuracy run:" in measured.stdout

    too_few = check("run", "--data", str(packed), "--device", "cpu", "--steps", "10", "--batch-size", "16")
    assert too_few.returncode == 1
    assert "--steps 10 and --warmup-steps 5 of batch 16 need 240 training images" in too_few.stderr


def test_a_profiles_recipe_travels_in_parts_and_trains_only_once_every_part_is_there(tmp_path, prepared, check):
    parts = tmp_path / "gpu_recipe"

    def pack(*assignments: str) -> subprocess.CompletedProcess:
        options = [option for assignment in assignments for option in ("-S", assignment)]
        return check("pack-recipe", "--profile", "quick-cpu", "--prepared", str(prepared), "--out", str(parts),
                     "--part-mib", "0.1", "-S", "model.preset=attention56_tiny", "-S", "train.batch_size=16",
                     "-S", "evaluate.translate_tta=true", *options)

    packing = pack("train.epochs=2")
    assert packing.returncode == 0, packing.stderr[-3000:]
    # 0.1 MiB holds 34 images of 3,072 bytes: the 136 images take 4 parts.
    assert sorted(path.name for path in parts.iterdir()) == [f"part-{k}-of-4.npz" for k in range(1, 5)]
    assert "profile quick-cpu, 96 training and 40 test images in 4 part(s)" in packing.stdout

    report_file = tmp_path / "out" / "recipe.json"
    trained = check("recipe", "--data", str(parts), "--device", "cpu", "--out", str(report_file))
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert (report["epochs"], report["train_images"], report["test_images"]) == (2, 96, 40)
    assert report["recipe"]["preset"] == "attention56_tiny" and report["recipe"]["evaluate"]["translate_tta"]
    assert report["recipe"]["train"]["optimizer"]["lr"] == 0.2  # conf/config.yaml's, under the profile
    assert [row["epoch"] for row in report["curve"]] == [1, 2] and 0.0 <= report["test_accuracy"] <= 1.0
    assert "epoch 2/2: train loss" in trained.stdout and "recipe quick-cpu:" in trained.stdout

    shorter = check("recipe", "--data", str(parts), "--device", "cpu", "--epochs", "1")
    assert shorter.returncode == 0 and "epoch 1/1" in shorter.stdout and "epoch 2/" not in shorter.stdout

    kept = (parts / "part-4-of-4.npz").read_bytes()
    (parts / "part-2-of-4.npz").unlink()
    missing = check("recipe", "--data", str(parts), "--device", "cpu")
    assert missing.returncode == 1 and "lacks part-2-of-4.npz of pack" in missing.stderr

    assert pack("train.epochs=3").returncode == 0  # another pack, whose parts replace the first's
    (parts / "part-9-of-9.npz").write_bytes(kept)  # and a part left over from the first
    mixed = check("recipe", "--data", str(parts), "--device", "cpu")
    assert mixed.returncode == 1 and "mixes parts of different packs" in mixed.stderr


def test_a_recipe_given_minutes_measures_its_step_first_and_trains_the_epochs_that_fit(tmp_path, prepared, check):
    parts = tmp_path / "gpu_recipe"
    packing = check("pack-recipe", "--profile", "quick-cpu", "--prepared", str(prepared), "--out", str(parts),
                    "-S", "model.preset=attention56_tiny", "-S", "train.batch_size=16", "-S", "train.epochs=1000")
    assert packing.returncode == 0, packing.stderr[-3000:]

    report_file = tmp_path / "out" / "recipe.json"
    budget = 0.3  # 18 s: the data and a calibration took 6 s of a 0.1-minute budget on a busy 2-core CI run
    trained = check("recipe", "--data", str(parts), "--device", "cpu", "--minutes", str(budget),
                    "--calibration-steps", "3", "--out", str(report_file))
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads(report_file.read_text())
    calibration = report["calibration"]
    assert calibration["trained"] == "eager" and "compiled" not in calibration  # the recipe does not compile
    assert calibration["eager"]["img_per_s"] > 0
    assert 1 <= report["epochs"] == calibration["epochs_fitting"] < 1000
    assert len(report["curve"]) == report["epochs"] and report["minutes_budget"] == budget
    # The fit aims under the budget at the rate the calibration measured. On a 2-core CI run
    # shared with Ray tests the epochs then ran slower than its 3 steps and overshot by as much
    # (0.47 minutes of 0.3): measured against the rate they trained at, not the machine's load.
    slowdown = max(1.0, calibration["eager"]["img_per_s"] / statistics.mean(
        epoch["images_per_second"] for epoch in report["curve"]))
    assert report["minutes"] < budget * 1.5 * slowdown, (report["minutes"], slowdown)
    assert f"{report['epochs']} epochs fit in {budget} minutes (the recipe has 1000" in trained.stdout

    too_short = check("recipe", "--data", str(parts), "--device", "cpu", "--minutes", "0.0001")
    assert too_short.returncode == 1 and "--minutes 0.0001 fits no epoch" in too_short.stderr
    assert "give more minutes" in too_short.stderr and "epoch 1/" not in too_short.stdout

    graphed_pack = tmp_path / "graphed"
    assert check("pack-recipe", "--profile", "quick-cpu", "--prepared", str(prepared), "--out", str(graphed_pack),
                 "-S", "model.preset=attention56_tiny", "-S", "train.batch_size=16", "-S", "train.num_workers=1",
                 "-S", "train.use_gpu=true", "-S", "train.cuda_graphs=true").returncode == 0
    graphs_here = check("recipe", "--data", str(graphed_pack), "--device", "cpu")
    assert graphs_here.returncode == 1 and "sets train.cuda_graphs, which needs a CUDA device" in graphs_here.stderr


def test_the_step_profile_reports_each_batch_sizes_rate_without_any_data(tmp_path, check):
    report_file = tmp_path / "out" / "profile.json"
    profiled = check("profile", "--device", "cpu", "--preset", "attention56_tiny", "--batch-sizes", "8", "16",
                     "--steps", "2", "--warmup-steps", "1", "--profiled-steps", "1", "--rows", "3",
                     "--out", str(report_file))
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert [row["batch_size"] for row in report["batches"]] == [8, 16]
    assert all(row["img_per_s"] > 0 and row["step_ms"] > 0 for row in report["batches"])
    assert all(row["gpu_busy_ms"] is None and row["kernels_per_step"] is None for row in report["batches"])
    assert "batch     8:" in profiled.stdout and "## batch 16, by self_cpu_time_total" in profiled.stdout
    graphs_here = check("profile", "--device", "cpu", "--preset", "attention56_tiny", "--cuda-graphs")
    assert graphs_here.returncode == 1 and "--cuda-graphs needs a CUDA device, not cpu" in graphs_here.stderr
