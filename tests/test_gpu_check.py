"""The GPU check (benchmarks/gpu_check.py) runs as the device machine runs it, on the CPU here:
pack a prepared dataset into the one file that travels, then measure from that file with a
tiny model, in a clean environment with the repository's code alone on the path."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, stage_env, synthetic_split
from resattn.data import STATS_FILE, channel_stats, save_split, write_json


def test_the_gpu_check_packs_its_data_and_reports_every_figure(tmp_path):
    prepared = tmp_path / "prepared"
    train, test = synthetic_split(96, 0), synthetic_split(40, 1)
    save_split(prepared / "train.npz", train)
    save_split(prepared / "test.npz", test)
    mean, std = channel_stats(train.images)
    write_json(prepared / STATS_FILE, {"mean": mean, "std": std})
    script, packed = str(ROOT / "benchmarks" / "gpu_check.py"), tmp_path / "gpu_check.npz"

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=stage_env(), capture_output=True,
                              text=True, timeout=600)

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
    assert [mode["precision"] for mode in report["modes"]] == ["float32", "bfloat16"]
    assert all(mode["img_per_s"] > 0 and mode["host_syncs_per_step"] is None for mode in report["modes"])
    accuracy = report["accuracy"]
    assert (accuracy["train_images"], accuracy["test_images"], accuracy["epochs"]) == (80, 30, 1)
    assert 0.0 <= accuracy["test_accuracy"] <= 1.0
    assert report["data"] == "80 CIFAR-10 training and 30 test images (gpu_check.npz)"
    assert "accuracy run:" in measured.stdout

    too_few = check("run", "--data", str(packed), "--device", "cpu", "--steps", "10", "--batch-size", "16")
    assert too_few.returncode == 1
    assert "--steps 10 and --warmup-steps 5 of batch 16 need 240 training images" in too_few.stderr
