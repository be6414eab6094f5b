"""DVC stage `train`: data-parallel training with Ray Train (V2), tracked in MLflow.

The driver validates params, starts (or joins) Ray, opens the MLflow run and launches a
TorchTrainer; each worker runs `train_loop_per_worker`. Every epoch rank 0 checkpoints the full
training state through `ray.train.report`. The Ray run is named after a hash of everything that
shapes training, so rerunning an interrupted stage with the same params and data resumes from
the latest checkpoint (and the same MLflow run) instead of starting over, while changed params
start a fresh run.

Outputs: models/model.pt (weights + model config), reports/train.json (DVC metrics),
reports/train_history.csv (DVC plots), models/mlflow_run.json (for the later stages).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient

from pipeline.common import run_stage
from pipeline.config import ConfigError, Params
from resattn.cifar10 import Split
from resattn.data import Normalization, load_split, to_tensor_nchw, write_json
from resattn.model import create_model
from resattn.training import build_optimizer, build_scheduler, evaluate, train_epoch, unwrap

MODEL_DIR = Path("models")
MODEL_FILE = MODEL_DIR / "model.pt"
RUN_FILE = MODEL_DIR / "mlflow_run.json"
METRICS_FILE = Path("reports/train.json")
HISTORY_FILE = Path("reports/train_history.csv")
STATE_FILE = "state.pt"
PROGRESS_SECONDS = 20.0


# --------------------------------------------------------------------------------------------
# The worker loop


def _log_to_mlflow(tracking_uri: str, run_id: str, metrics: dict, epoch: int) -> None:
    try:
        MlflowClient(tracking_uri).log_batch(
            run_id,
            metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), epoch) for k, v in metrics.items()],
        )
    except Exception as error:  # noqa: BLE001 - a tracking outage must not cost the training
        print(f"warning: could not log epoch {epoch} to MLflow ({error}); training goes on", flush=True)


def train_loop_per_worker(config: dict) -> None:
    params = Params.model_validate(config["params"])
    train_cfg = params.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if train_cfg.mixed_precision else None

    prepared = Path(config["prepared_dir"])
    train_split, val_split = load_split(prepared / "train.npz"), load_split(prepared / "val.npz")
    if train_cfg.train_subset:
        train_split = Split(train_split.images[: train_cfg.train_subset], train_split.labels[: train_cfg.train_subset])
    norm = Normalization.load(prepared)
    train_images, train_labels = to_tensor_nchw(train_split.images), torch.from_numpy(train_split.labels)
    # Each worker validates its own slice; the sums are combined below.
    val_images = to_tensor_nchw(val_split.images[rank::world_size])
    val_labels = torch.from_numpy(val_split.labels[rank::world_size])
    if use_cuda:  # the whole dataset fits on any GPU: no host-to-device copy per batch
        train_images, train_labels = train_images.to(device), train_labels.to(device)

    torch.manual_seed(train_cfg.seed)
    model = create_model(params.model.preset, **params.model.build_kwargs())
    if train_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    opt = train_cfg.optimizer
    optimizer = build_optimizer(
        model, opt.name, opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
        weight_decay=opt.weight_decay, decay_norm_and_bias=opt.decay_norm_and_bias,
    )
    per_worker_batch = train_cfg.batch_size // world_size
    steps_per_epoch = (len(train_labels) // world_size) // per_worker_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_labels)} training images make no batch of {train_cfg.batch_size}")
    schedule = train_cfg.schedule
    scheduler = build_scheduler(
        optimizer,
        total_steps=steps_per_epoch * train_cfg.epochs,
        schedule=schedule.name,
        warmup_steps=round(schedule.warmup_epochs * steps_per_epoch),
        milestones=[round(m * steps_per_epoch) for m in schedule.milestones],
        gamma=schedule.gamma,
    )

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)

    total_images = steps_per_epoch * per_worker_batch * world_size
    if rank == 0:  # CPU, memory and GPU use sampled into the run while training
        mlflow.set_tracking_uri(config["tracking_uri"])
        mlflow.start_run(run_id=config["run_id"], log_system_metrics=True)
    try:
        for epoch in range(start_epoch, train_cfg.epochs):
            last_print = [time.monotonic()]

            def progress(done: int, epoch: int = epoch) -> None:
                if rank == 0 and time.monotonic() - last_print[0] >= PROGRESS_SECONDS:
                    last_print[0] = time.monotonic()
                    print(f"  epoch {epoch + 1}: {done * world_size:,}/{total_images:,} images", flush=True)

            lr = optimizer.param_groups[0]["lr"]
            result = train_epoch(
                model, optimizer, scheduler, train_images, train_labels, norm,
                batch_size=per_worker_batch, seed=train_cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                label_smoothing=train_cfg.label_smoothing, device=device, channels_last=train_cfg.channels_last,
                autocast_dtype=autocast_dtype, progress=progress,
            )
            val = evaluate(
                unwrap(model), val_images, val_labels, norm, batch_size=train_cfg.eval_batch_size,
                device=device, channels_last=train_cfg.channels_last, autocast_dtype=autocast_dtype,
            )
            sums = torch.tensor([val.loss * len(val_labels), val.accuracy * len(val_labels), len(val_labels)], dtype=torch.float64, device=device)
            if world_size > 1:
                torch.distributed.all_reduce(sums)
            metrics = {
                "epoch": epoch + 1,
                "train_loss": result.loss,
                "train_accuracy": result.accuracy,
                "val_loss": sums[0].item() / sums[2].item(),
                "val_accuracy": sums[1].item() / sums[2].item(),
                "lr": lr,
                "images_per_second": result.images_per_second,  # images summed over workers
                "epoch_seconds": result.seconds,
            }
            history.append(metrics)
            if rank == 0:
                print(
                    f"epoch {epoch + 1}/{train_cfg.epochs}: train loss {metrics['train_loss']:.4f} "
                    f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
                    f"acc {metrics['val_accuracy']:.4f} | {metrics['images_per_second']:.0f} img/s",
                    flush=True,
                )
                _log_to_mlflow(config["tracking_uri"], config["run_id"], {k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
                with tempfile.TemporaryDirectory() as directory:
                    torch.save(
                        {
                            "model": unwrap(model).state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                            "epoch": epoch,
                            "history": history,
                        },
                        Path(directory) / STATE_FILE,
                    )
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
                print(f"checkpoint saved for epoch {epoch + 1}", flush=True)
            else:
                ray.train.report(metrics)
    finally:
        if rank == 0:
            mlflow.end_run()


# --------------------------------------------------------------------------------------------
# The driver


def run_identity(params: Params, data_hash: str) -> str:
    """Stable name for a training run: same params and data, same name, so a rerun resumes."""
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(), "data": data_hash}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def prepared_data_hash(prepared_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("train.npz", "val.npz", "stats.json"):
        digest.update((prepared_dir / name).read_bytes())
    return digest.hexdigest()


def resolve_tracking_uri(uri: str) -> str:
    """Workers run in other directories: make a relative sqlite path absolute."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def resolve_storage_path(params: Params) -> str:
    """Ray storage for checkpoints and run state: a URI as given, a local path made absolute."""
    path = params.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())


def start_ray(params: Params) -> None:
    """Join `ray.address`, or start a local Ray whose dashboard listens on loopback only."""
    if ray.is_initialized():
        return
    ray.init(
        address=params.ray.address,
        # Train V2 tees each worker print() into its logger as well: one copy is enough.
        runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        **({} if params.ray.address else {"num_cpus": os.cpu_count(), "dashboard_host": "127.0.0.1"}),
    )


def log_params(client: MlflowClient, run_id: str, flat: dict[str, str]) -> None:
    # MLflow caps a param value at 6,000 characters.
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flat.items()])


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_lock_data_hash() -> str:
    """The prepared data's hash as DVC recorded it (absent before the first repro)."""
    import yaml

    lock = Path("dvc.lock")
    if not lock.is_file():
        return "unknown"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    for out in stages.get("preprocess", {}).get("outs", []):
        if out.get("path") == "data/prepared":
            return out.get("md5", "unknown")
    return "unknown"


def flatten(prefix: str, value) -> dict[str, str]:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return flat
    return {prefix: json.dumps(value) if isinstance(value, (list, dict)) else str(value)}


def check_resources(params: Params) -> None:
    """Fail before Ray starts on a request this machine cannot meet (local runs only)."""
    if params.ray.address:
        return
    cpus = os.cpu_count() or 1
    if params.train.use_gpu and not torch.cuda.is_available():
        raise ConfigError("train.use_gpu is true but no CUDA GPU is visible; set it to false or run on a GPU node")
    gpus = torch.cuda.device_count()
    if params.train.use_gpu and params.train.num_workers > gpus:
        raise ConfigError(f"train.num_workers {params.train.num_workers} exceeds the {gpus} GPU(s) here")
    if not params.train.use_gpu and params.train.num_workers > cpus:
        raise ConfigError(
            f"train.num_workers {params.train.num_workers} exceeds the {cpus} CPU(s) here; "
            f"use at most {cpus} or set ray.address to a cluster"
        )


def open_mlflow_run(params: Params, tracking_uri: str, run_name: str, state_dir: Path) -> str:
    """The MLflow run of this training run: reopened on resume, created otherwise."""
    marker = state_dir / "mlflow_run_id"
    client = MlflowClient(tracking_uri)
    if marker.is_file():
        run_id = marker.read_text().strip()
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the tracking store was reset: start a new run below
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={"git_commit": git_commit(), "data_hash": dvc_lock_data_hash(), "seed": str(params.train.seed),
              "profile": params.profile},
    )
    log_params(client, run.info.run_id, flatten("", params.model_dump(exclude={"profiles"})))
    state_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run.info.run_id)
    return run.info.run_id


def save_model(state: dict, params: Params, path: Path) -> None:
    """The trained weights with what rebuilds the network, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = create_model(params.model.preset, **params.model.build_kwargs()).config
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save({"model": state["model"], "preset": params.model.preset,
                    "overrides": params.model.build_kwargs(), "config": config.__dict__}, tmp)
    os.replace(tmp.name, path)


def train(params: Params) -> None:
    check_resources(params)
    prepared = Path(params.data.prepared_dir).resolve()
    if not (prepared / "train.npz").is_file():
        raise ConfigError(f"{prepared} has no train.npz; run the preprocess stage first (dvc repro preprocess)")
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    storage_path = resolve_storage_path(params)
    run_name = f"{params.ray.run_name}-{run_identity(params, prepared_data_hash(prepared))}"
    state_dir = Path(storage_path) / run_name if "://" not in storage_path else Path("ray_results") / run_name
    run_id = open_mlflow_run(params, tracking_uri, run_name, state_dir)
    print(f"training run {run_name} (MLflow run {run_id}) on {params.train.num_workers} worker(s)", flush=True)

    start_ray(params)
    started = time.monotonic()
    trainer = ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params.model_dump(), "prepared_dir": str(prepared),
                           "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=params.train.num_workers, use_gpu=params.train.use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=params.train.max_failures),
        ),
    )
    result = trainer.fit()
    wall_seconds = time.monotonic() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)

    save_model(state, params, MODEL_FILE)
    history = state["history"]
    HISTORY_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(HISTORY_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    final = history[-1]
    write_json(METRICS_FILE, {
        "epochs": final["epoch"],
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "train_accuracy": final["train_accuracy"],
        "best_val_accuracy": max(h["val_accuracy"] for h in history),
        "images_per_second": sum(h["images_per_second"] for h in history) / len(history),
        "fit_seconds": round(wall_seconds, 1),
    })
    write_json(RUN_FILE, {"run_id": run_id, "tracking_uri": params.mlflow.tracking_uri, "ray_run": run_name})
    client = MlflowClient(tracking_uri)
    client.log_artifact(run_id, str(HISTORY_FILE), "training")
    client.log_metric(run_id, "fit_seconds", wall_seconds)
    print(f"final validation accuracy {final['val_accuracy']:.4f} after {final['epoch']} epochs "
          f"({wall_seconds / 60:.1f} min); model in {MODEL_FILE}")


if __name__ == "__main__":
    run_stage(__doc__, train)
