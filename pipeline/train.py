"""DVC stage `train`: data-parallel training with Ray Train (V2), tracked in MLflow.

The driver validates params, checks the tracking server and storage it will need, starts (or
joins) Ray, puts the prepared arrays into Ray's object store (so workers on any node of a
cluster get them, with no shared filesystem), opens the MLflow run and launches a TorchTrainer;
each worker runs `train_loop_per_worker`. Every epoch rank 0 checkpoints the full
training state through `ray.train.report`. The Ray run is named after a hash of everything that
shapes training, so rerunning an interrupted stage with the same params and data resumes from
the latest checkpoint (and the same MLflow run, found by its `ray_run` tag) instead of starting
over, while changed params start a fresh run. `ray.storage_path` may be local or s3://.

Outputs: models/model.pt (weights + model config), reports/train.json (DVC metrics),
reports/train_history.csv (DVC plots), models/mlflow_run.json (for the later stages).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient

from pipeline.common import StageError, run_stage
from pipeline.config import ConfigError, Params
from pipeline.remote import check_run_services, redact
from resattn.cifar10 import Split
from resattn.data import STATS_FILE, Normalization, load_split, to_tensor_nchw, write_csv, write_json
from resattn.model import create_model
from resattn.training import (
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    evaluate,
    global_sums,
    train_epoch,
    unwrap,
)

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
        print(f"warning: could not log epoch {epoch} to MLflow ({type(error).__name__}); training goes on "
              f"and the driver logs it when MLflow is back", flush=True)


def _start_system_metrics(tracking_uri: str, run_id: str) -> bool:
    """CPU, memory and GPU use sampled into the run while training, if MLflow answers."""
    try:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
        return True
    except Exception as error:  # noqa: BLE001 - a tracking outage must not cost the training
        print(f"warning: MLflow is unreachable ({type(error).__name__}); training goes on without "
              f"system metrics", flush=True)
        return False


def use_reserved_cpus() -> int:
    """Run as many intra-op threads as CPUs Ray reserved for this worker; returns that count.

    Ray sets OMP_NUM_THREADS for a worker only once the worker process runs, which is too late
    when torch is already loaded (a set-up hook or an import is enough): OpenMP then keeps one
    thread per core. On 2 cores, two 1-CPU workers ran 4 busy threads and trained at 75-95
    instead of 341-439 img/s (BENCHMARKS.md). torch.set_num_threads here, in the thread that
    trains, holds whatever the environment."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(int(cpus), 1)
    torch.set_num_threads(threads)
    return threads


def report_divergence(reason: str, epoch: int, rank: int, history: list[dict]) -> None:
    """End every worker's loop normally, with the reason as the last checkpoint (the driver
    reads it; a rerun of the same params finds it and stops at once): a raised error would make
    Ray Train restart the workers, only to diverge again at the same step. A diverged run has
    no validation accuracy: NaN, which Tune's schedulers and searchers pass over."""
    metrics = {"epoch": epoch + 1, "val_accuracy": float("nan"), "diverged": 1.0}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save({"diverged": reason, "epoch": epoch, "history": history}, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def train_loop_per_worker(config: dict) -> None:
    threads = use_reserved_cpus()
    params = Params.model_validate(config["params"])
    train_cfg = params.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if train_cfg.mixed_precision else None

    train_split, val_split, norm = ray.get(config["data"])  # read-only views of the object store
    if train_cfg.train_subset:
        train_split = Split(train_split.images[: train_cfg.train_subset], train_split.labels[: train_cfg.train_subset])
    train_images, train_labels = to_tensor_nchw(train_split.images), torch.tensor(train_split.labels)
    # Each worker validates its own slice; the sums are combined below.
    val_images = to_tensor_nchw(val_split.images[rank::world_size])
    val_labels = torch.tensor(val_split.labels[rank::world_size])
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
        state = load_resumable_state(checkpoint)
        if "diverged" in state:
            report_divergence(state["diverged"], state["epoch"], rank, state["history"])
            return
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)

    total_images = steps_per_epoch * per_worker_batch * world_size
    if rank == 0:
        print(f"{world_size} worker(s) x {threads} CPU thread(s) on {device.type}; {total_images:,} training images "
              f"per epoch in batches of {per_worker_batch * world_size}", flush=True)
    sampling = rank == 0 and _start_system_metrics(config["tracking_uri"], config["run_id"])
    try:
        for epoch in range(start_epoch, train_cfg.epochs):
            last_print = [time.monotonic()]

            def progress(done: int, epoch: int = epoch) -> None:
                if rank == 0 and time.monotonic() - last_print[0] >= PROGRESS_SECONDS:
                    last_print[0] = time.monotonic()
                    print(f"  epoch {epoch + 1}: {done * world_size:,}/{total_images:,} images", flush=True)

            lr = optimizer.param_groups[0]["lr"]
            try:
                result = train_epoch(
                    model, optimizer, scheduler, train_images, train_labels, norm,
                    batch_size=per_worker_batch, seed=train_cfg.seed, epoch=epoch, rank=rank, world_size=world_size,
                    label_smoothing=train_cfg.label_smoothing, device=device, channels_last=train_cfg.channels_last,
                    autocast_dtype=autocast_dtype, progress=progress,
                )
            except NonFiniteLossError as error:
                report_divergence(str(error), epoch, rank, history)
                return
            val = evaluate(
                unwrap(model), val_images, val_labels, norm, batch_size=train_cfg.eval_batch_size,
                device=device, channels_last=train_cfg.channels_last, autocast_dtype=autocast_dtype,
            )
            val_loss, val_correct, val_count = global_sums(
                val.loss * len(val_labels), val.accuracy * len(val_labels), len(val_labels), device=device)
            metrics = {
                "epoch": epoch + 1,
                "train_loss": result.loss,
                "train_accuracy": result.accuracy,
                "val_loss": val_loss / val_count,
                "val_accuracy": val_correct / val_count,
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
        if sampling:
            try:
                mlflow.end_run()
            except Exception:  # noqa: BLE001 - the driver reports MLflow trouble once, at the end
                pass


# --------------------------------------------------------------------------------------------
# The driver


def run_identity(params: Params, data_hash: str) -> str:
    """Stable name for a training run: same params and data, same name, so a rerun resumes."""
    shaping = {"model": params.model.model_dump(), "train": params.train.model_dump(), "data": data_hash}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]


def load_prepared(prepared_dir: Path) -> tuple[tuple[Split, Split, Normalization], str]:
    """What every worker trains and validates on, as the driver puts it into the object store,
    and the SHA-256 of the files it came from (part of the run's identity). Each file is read
    once: it is hashed and decoded from the same bytes."""
    if not (prepared_dir / "train.npz").is_file():
        raise ConfigError(f"{prepared_dir} has no train.npz; run the preprocess stage first (dvc repro preprocess)")
    digest = hashlib.sha256()
    contents = {}
    for name in ("train.npz", "val.npz", STATS_FILE):
        contents[name] = (prepared_dir / name).read_bytes()
        digest.update(contents[name])
    data = (load_split(io.BytesIO(contents["train.npz"])), load_split(io.BytesIO(contents["val.npz"])),
            Normalization.from_json(contents[STATS_FILE]))
    return data, digest.hexdigest()


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    """The training state a worker saved, from local or s3:// storage; tensors only."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_resumable_state(latest: ray.train.Checkpoint) -> dict:
    """The state of the newest checkpoint that loads. A truncated or corrupted file is reported
    and skipped for the one kept before it (CheckpointConfig keeps two); if none loads, the
    error names every file tried. Never unpickles code (weights_only)."""
    parent, latest_name = latest.path.rstrip("/").rsplit("/", 1)
    found = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    # Ray names checkpoint folders checkpoint_<timestamp>: older sorts lower.
    older = sorted((info.path for info in found if info.type == pyarrow.fs.FileType.Directory
                    and info.base_name.startswith("checkpoint_") and info.base_name < latest_name), reverse=True)
    failures = []
    for candidate in [latest, *(ray.train.Checkpoint(path, filesystem=latest.filesystem) for path in older)]:
        try:
            return load_checkpoint_state(candidate)
        except Exception as error:  # noqa: BLE001 - any unreadable file: try the previous one
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"
            failures.append(f"{candidate.path}/{STATE_FILE} ({reason})")
            print(f"warning: checkpoint {candidate.path}/{STATE_FILE} is unreadable ({reason}); trying the one "
                  f"before it", flush=True)
    raise RuntimeError("no readable checkpoint to resume from: " + "; ".join(failures))


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


# A Ray instance started for one run, on one machine, does not need these Ray Train helpers.
# Each Ray process costs ~0.7% of a core even when idle, which on 2 cores is taken from the
# training worker's intra-op threads (BENCHMARKS.md, "Ray Train's overhead"). The local Ray's
# processes inherit the driver's environment; a value set by the user wins.
LOCAL_RAY_ENV = {
    # Polls the nodes for spot-instance preemption: a local instance has no preemptible node.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Prometheus metrics for the Ray dashboard's Grafana panels; MLflow has the run's metrics.
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
# Ray Train's own notes (worker group started, each report with its checkpoint) stay in Ray's
# log files; the console gets warnings and errors, and the pipeline's own lines.
RAY_TRAIN_LOGGING = ray.train.LoggingConfig(log_level="WARNING")
RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_address(params: Params) -> str | None:
    """The Ray cluster to join: `ray.address` if set, else the one this process runs in
    (`ray job submit` sets RAY_ADDRESS for its entry point; so may a user), else None: start a
    local Ray for this run. Unlike Ray's own default, a cluster that `ray start` left on this
    machine is joined only when asked for (`ray.address: auto`)."""
    return params.ray.address or os.environ.get("RAY_ADDRESS") or None


def start_ray(params: Params, *, sweep: bool = False) -> None:
    """Join the cluster of `cluster_address`, or start a local Ray with the fewest helper
    processes. Its dashboard (on loopback only) starts if `ray.dashboard`, and always for a
    `sweep`: when Tune stops a trial early its Train controller dies with the trial, and only
    the placement-group cleaner, through the dashboard's state API, sees that and frees the
    trial's CPUs for the next one."""
    if ray.is_initialized():
        return
    address = cluster_address(params)
    local = address is None
    dashboard_port = None
    if local:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        # Ray 2.60 turns token authentication on for a new local Ray and warns that it did, on
        # every start; it stays on, the warning goes.
        logging.getLogger(RAY_AUTH_SETUP_LOGGER).setLevel(logging.ERROR)
        # Train V2's placement-group cleaner reaches the dashboard through Ray's state API,
        # which, unless told, looks for "the" cluster of this machine: the one `ray start`
        # last recorded in /tmp/ray, alive or dead. Another Ray there, or a stale record of
        # one, left a sweep's early-stopped trials holding their CPUs forever. Name ours.
        dashboard_port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # Ray colours each worker's prefix; in a log file or a pipe those are escape codes.
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    dashboard = params.ray.dashboard or sweep
    hook = "quiet_libraries_and_cleaner" if local and not dashboard else "quiet_libraries"
    ray.init(
        address=address or "local",
        logging_level=logging.WARNING,
        runtime_env={
            "env_vars": {
                # Train V2 tees each worker print() into its logger as well: one copy is enough.
                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                # During a tracking outage a worker's logging call gives up after seconds, not
                # MLflow's default of minutes of retries; the driver logs what was missed.
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
                "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
                "MLFLOW_LOGGING_LEVEL": os.environ.get("MLFLOW_LOGGING_LEVEL", "WARNING"),
            },
            "worker_process_setup_hook": f"pipeline.ray_hooks.{hook}",
        },
        **({"num_cpus": os.cpu_count(), "include_dashboard": dashboard, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port} if local else {}),
    )


def build_trainer(params: Params, data: ray.ObjectRef, tracking_uri: str, run_id: str, *, name: str,
                  storage_path: str, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """The one TorchTrainer of the pipeline, for a training run and for each sweep trial: the
    worker loop above on `train.num_workers` workers, with the prepared arrays in the object
    store, logging to MLflow run `run_id`; two checkpoints kept (`load_resumable_state` falls
    back to the older)."""
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params.model_dump(), "data": data, "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=params.train.num_workers, use_gpu=params.train.use_gpu),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=params.train.max_failures),
            logging_config=RAY_TRAIN_LOGGING,
            callbacks=callbacks,
        ),
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


def backfill_metrics(client: MlflowClient, run_id: str, history: list[dict]) -> int:
    """Log every epoch metric the MLflow run lacks (workers skip logging during an outage);
    returns how many values were missing."""
    keys = [key for key in history[0] if key != "epoch"]
    logged = {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}
    now = int(time.time() * 1000)
    missing = [mlflow.entities.Metric(key, float(row[key]), now, row["epoch"])
               for row in history for key in keys if row["epoch"] not in logged[key]]
    for start in range(0, len(missing), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=missing[start : start + 1000])
    return len(missing)


def root_cause(error: BaseException) -> str:
    """The innermost error a worker raised, as one line: type and message."""
    failures = getattr(error, "worker_failures", None) or {}
    error = next(iter(failures.values()), error)
    while getattr(error, "cause", None) is not None:  # RayTaskError wraps the worker's exception
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def check_resources(params: Params) -> None:
    """Fail before Ray starts on a request this machine cannot meet (local runs only)."""
    if cluster_address(params):
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


def open_mlflow_run(params: Params, tracking_uri: str, run_name: str) -> str:
    """The MLflow run of this training run: the one tagged with its Ray run name (a resume),
    else a new one. The tag lives with the run, so this works whatever the Ray storage."""
    client = MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(params.mlflow.experiment)
    if found := client.search_runs([experiment.experiment_id], f"tags.ray_run = '{run_name}'", max_results=1):
        return found[0].info.run_id
    run = client.create_run(
        experiment.experiment_id,
        run_name=run_name,
        tags={"ray_run": run_name, "git_commit": git_commit(), "data_hash": dvc_lock_data_hash(),
              "seed": str(params.train.seed), "profile": params.profile},
    )
    log_params(client, run.info.run_id, flatten("", params.model_dump()))
    return run.info.run_id


def save_model(state: dict, params: Params, path: Path) -> None:
    """The trained weights with what rebuilds the network, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = create_model(params.model.preset, **params.model.build_kwargs()).config
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save({"model": state["model"], "preset": params.model.preset,
                    "overrides": params.model.build_kwargs(), "config": config.__dict__}, tmp)
    os.replace(tmp.name, path)


def mark_failed(tracking_uri: str, run_id: str, reason: str) -> None:
    """The MLflow run ends FAILED, with the reason as a tag, so the UI does not show it running."""
    try:
        client = MlflowClient(tracking_uri)
        client.set_tag(run_id, "failure", reason[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception as error:  # noqa: BLE001 - the stage fails with its own message anyway
        print(f"warning: could not mark MLflow run {run_id} failed ({type(error).__name__})", file=sys.stderr)


def train(params: Params) -> None:
    check_resources(params)
    check_run_services(params)
    prepared = Path(params.data.prepared_dir).resolve()
    data, data_hash = load_prepared(prepared)
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    storage_path = resolve_storage_path(params)
    run_name = f"{params.ray.run_name}-{run_identity(params, data_hash)}"
    run_id = open_mlflow_run(params, tracking_uri, run_name)
    print(f"training run {run_name} (MLflow run {run_id}) on {params.train.num_workers} worker(s)", flush=True)

    start_ray(params)
    started = time.monotonic()
    trainer = build_trainer(params, ray.put(data), tracking_uri, run_id, name=run_name, storage_path=storage_path)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise StageError(
            f"training run {run_name} failed and was restarted train.max_failures={params.train.max_failures} "
            f"time(s) without success: {root_cause(error)}. Its checkpoints stay in {storage_path}/{run_name}; "
            f"rerunning the stage resumes from them"
        ) from None
    wall_seconds = time.monotonic() - started
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    state = load_checkpoint_state(result.checkpoint)
    if "diverged" in state:
        MODEL_FILE.unlink(missing_ok=True)  # no model for evaluate or register to pick up
        mark_failed(tracking_uri, run_id, state["diverged"])
        raise StageError(f"{state['diverged']}. No model was saved; the record stays in {storage_path}/{run_name}, "
                         f"so rerunning these params stops at once (they diverge the same way)")

    save_model(state, params, MODEL_FILE)
    history = state["history"]
    write_csv(HISTORY_FILE, history)
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
    try:
        if missed := backfill_metrics(client, run_id, history):
            print(f"logged {missed} epoch metric values that MLflow had missed", flush=True)
        client.log_artifact(run_id, str(HISTORY_FILE), "training")
        client.log_metric(run_id, "fit_seconds", wall_seconds)
    except Exception as error:  # noqa: BLE001 - any tracking failure: the training itself is safe
        raise StageError(
            f"training finished and {MODEL_FILE} is saved, but MLflow at {redact(tracking_uri)} did not take the "
            f"run's metrics ({type(error).__name__}). Once it answers again, rerun this stage: it finds the "
            f"finished run and logs what is missing"
        ) from None
    print(f"final validation accuracy {final['val_accuracy']:.4f} after {final['epoch']} epochs "
          f"({wall_seconds / 60:.1f} min); model in {MODEL_FILE}")


if __name__ == "__main__":
    run_stage(__doc__, train)
