"""Multi-node training on one machine, side by side: the same run on 1 Ray node x 2 workers and
on 2 Ray nodes x 1 worker, and what losing a node costs an elastic run. Prints the figures; record
them in BENCHMARKS.md.

    python benchmarks/multi_node.py --prepared data/prepared

Each layout is a real cluster from infra/local_stack.py on loopback (a head without CPUs, Ray
nodes with raylets of their own, S3 storage, an MLflow server), and each run is the train stage
as a user runs it (`python -m pipeline.train`), on the quick profile's model and recipe with a
subset of the training images. Throughput is the last epoch's (the first includes start-up).
The node loss: an elastic run (`train.num_workers: [1, 2]`) on the 2-node layout has node 2
SIGKILLed (`local_stack.py kill-node`) half-way through an epoch, as a preemption lands; the
figures are the times from the kill to the restarted group's start and to its first finished
epoch (the one in flight, trained again on one worker), against an epoch's time before it.
"""

from __future__ import annotations

import argparse
import csv
import json
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
STACK = [sys.executable, str(ROOT / "infra" / "local_stack.py")]


def local_stack_ports() -> list[str]:
    """The names of the ports infra/local_stack.py takes (its PORTS), each a --<name>-port option."""
    spec = importlib.util.spec_from_file_location("local_stack", ROOT / "infra" / "local_stack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PORTS)


class Stack:
    """A local stack with `nodes` Ray nodes of `cpus` CPUs each, on free ports, in `folder`."""

    def __init__(self, folder: Path, nodes: int, cpus: int):
        self.options = ["--dir", str(folder), "--num-cpus", "0", "--worker-nodes", str(nodes),
                        "--worker-node-cpus", str(cpus)]
        for name in local_stack_ports():
            self.options += [f"--{name}-port", str(free_port())]
        self.folder = folder

    def __enter__(self) -> dict:
        subprocess.run(STACK + ["up"] + self.options, check=True, capture_output=True, text=True)
        return json.loads((self.folder / "stack.json").read_text())

    def __exit__(self, *_) -> None:
        subprocess.run(STACK + ["down"] + self.options, check=True, capture_output=True)

    def control(self, action: str, node: int) -> None:
        subprocess.run(STACK + [action, "--node", str(node)] + self.options, check=True, capture_output=True)


def project(folder: Path, state: dict, args, name: str, **train) -> Path:
    """A project folder whose params.yaml runs the quick profile on the stack."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["prepared_dir"] = str(args.prepared.resolve())
    raw["train"] |= {"train_subset": args.images, "epochs": args.epochs} | train
    raw["ray"] |= {"address": "auto", "storage_path": f"s3://{state['buckets']['ray']}/{name}", "run_name": name}
    raw["mlflow"]["tracking_uri"] = state["mlflow_tracking_uri"]
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return folder


def start_training(folder: Path, state: dict, log: Path) -> subprocess.Popen:
    """The train stage in `folder`, on the stack of `state`, its output going to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=folder, stdout=out,
                                stderr=subprocess.STDOUT, env=os.environ | state["env"] | {"PYTHONPATH": str(ROOT)})


def last_epoch_rate(folder: Path) -> float:
    with open(folder / "reports" / "train_history.csv") as rows:
        return float(list(csv.DictReader(rows))[-1]["images_per_second"])


def throughput(args, layout: str, nodes: int, cpus: int, scratch: Path) -> float:
    with Stack(scratch / f"stack-{layout}", nodes, cpus) as state:
        folder = project(scratch / layout, state, args, layout, num_workers=2)
        driver = start_training(folder, state, scratch / f"{layout}.log")
        if driver.wait() != 0:
            raise SystemExit(f"the {layout} run failed; see {scratch / f'{layout}.log'}")
        return last_epoch_rate(folder)


def node_loss(args, scratch: Path) -> tuple[float, float, float]:
    """Seconds from the kill to the new group's start and to its first finished epoch, and an
    epoch's seconds before the kill."""
    stack = Stack(scratch / "stack-loss", 2, 1)
    with stack as state:
        folder = project(scratch / "loss", state, args, "loss", num_workers=[1, 2], epochs=args.epochs + 2,
                         elastic_resize_seconds=5.0)
        log = scratch / "loss.log"
        driver = start_training(folder, state, log)

        def wait_for(text: str, after: int) -> float:
            """The time `text` shows in the log after offset `after`."""
            while text not in log.read_text()[after:]:
                if driver.poll() is not None:
                    raise SystemExit(f"the elastic run ended before {text!r}; see {log}")
                time.sleep(0.1)
            return time.monotonic()

        killed = None
        try:
            wait_for("on 2 node(s)", 0)
            grown = len(log.read_text())
            # An epoch's time on both nodes, between two checkpoints.
            first = wait_for("checkpoint saved for epoch 1", grown)
            before = wait_for("checkpoint saved for epoch 2", grown) - first
            time.sleep(before / 2)
            lost = len(log.read_text())
            stack.control("kill-node", 2)
            killed = time.monotonic()
            restarted = wait_for("1 worker(s) x", lost) - killed
            recovered = wait_for("epoch 3/", lost) - killed
            driver.wait()
        finally:
            driver.kill()
            if killed is not None:
                stack.control("start-node", 2)
        return restarted, recovered, before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="the preprocess stage's output")
    parser.add_argument("--images", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["throughput", "node-loss"], default=["throughput", "node-loss"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="multi-node-") as scratch:
        scratch = Path(scratch)
        if "throughput" in args.parts:
            one_node = throughput(args, "one-node", 1, 2, scratch)
            two_nodes = throughput(args, "two-nodes", 2, 1, scratch)
            print(f"1 node x 2 workers:  {one_node:6.0f} img/s")
            print(f"2 nodes x 1 worker:  {two_nodes:6.0f} img/s  ({two_nodes / one_node:.2f}x)", flush=True)
        if "node-loss" in args.parts:
            restarted, recovered, epoch = node_loss(args, scratch)
            print(f"node lost mid-epoch: the group restarted on 1 worker {restarted:.0f} s after the kill, and "
                  f"finished the epoch in flight {recovered:.0f} s after it (an epoch took {epoch:.0f} s on 2 "
                  f"workers before)")


if __name__ == "__main__":
    main()
