"""The Ray runtime of training and sweeps: join the cluster a run is in or start a local Ray,
check what a local run asks for, and build the one TorchTrainer of the pipeline.

Which cluster: `ray.address` if set, else the one this process runs in (`ray job submit` sets
RAY_ADDRESS for its entry point), else a new local Ray with the fewest helper processes. A
cluster that `ray start` left on this machine is joined only when asked for (`ray.address:
auto`), unlike Ray's own default.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import urllib.parse
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from pipeline.checkpoints import CHECKPOINTS_KEPT
from pipeline.common import raise_on_sigterm
from pipeline.config import ConfigError, Params
from pipeline.remote import redact
from pipeline.tracking import EpochLogger
from pipeline.worker import train_loop_per_worker

# "0" puts Ray in its single-machine mode (see LOCAL_RAY_ENV).
LOOPBACK_ONLY_ENV_VAR = ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR

# A Ray instance started for one run, on one machine, does not need these Ray Train helpers.
# Each Ray process costs ~0.7% of a core even when idle, which on 2 cores is taken from the
# training worker's intra-op threads (BENCHMARKS.md, "Ray Train's overhead"). The local Ray's
# processes inherit the driver's environment; a value set by the user wins.
LOCAL_RAY_ENV = {
    # Polls the nodes for spot-instance preemption: a local instance has no preemptible node.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Prometheus metrics for the Ray dashboard's Grafana panels; MLflow has the run's metrics.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # Ray's single-machine mode (its default on macOS and Windows): the node's address is
    # 127.0.0.1, and every process of the local Ray listens there only. Otherwise the GCS, the
    # raylet and the workers listened on all interfaces, and the job agent and runtime-env
    # agent on the machine's address (tests/test_security.py checks every listening socket).
    LOOPBACK_ONLY_ENV_VAR: "0",
    # How long a stopping process waits to send its last task events (the dashboard's task
    # list) to the GCS; 5 s otherwise. After a SIGTERM to the stage's whole process group the
    # GCS no longer answers, and the driver waited out the 5 s before it stopped the raylet,
    # while the training workers trained on: 10 more epochs of a test run.
    "RAY_task_events_shutdown_flush_timeout_ms": "100",
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
    """The Ray cluster to join, or None: start a local Ray for this run."""
    return params.ray.address or os.environ.get("RAY_ADDRESS") or None


def is_node_local(uri: str) -> bool:
    """Whether `uri` names something on the disk of the node that reads it (a folder, a file
    URI, a sqlite database), not a place every node of a cluster reaches."""
    return urllib.parse.urlsplit(uri).scheme in ("", "file", "sqlite")


def resource_problem(params: Params, tracking_uri: str, *, cluster: str | None, nodes: int,
                     capacity: dict[str, float]) -> str | None:
    """What keeps a Ray from running `params`'s training, in one line; None if nothing. The
    Ray: this machine's (`cluster` None), or the cluster at address `cluster` with `nodes`
    alive nodes; `capacity`: its resources, with what an autoscaler may add."""
    train = params.train
    kind = "GPU" if train.use_gpu else "CPU"
    have = int(capacity.get(kind, 0))
    where = f"of the cluster at {cluster}" if cluster else "here"
    if train.use_gpu and not have:
        if cluster is None:
            return "train.use_gpu is true but no CUDA GPU is visible; set it to false or run on a GPU node"
        return f"train.use_gpu is true but the cluster at {cluster} has no GPU and cannot add one; set it to false"
    fewest, most = train.worker_range
    if fewest * (train.gpus_per_worker if train.use_gpu else 1) > have:  # an elastic group starts with its fewest
        advice = f"use at most {have}" + ("" if cluster else " or set ray.address to a cluster")
        return f"train.num_workers {train.workers_text} exceeds the {have} {kind}(s) {where}; {advice}"
    if nodes > 1 and is_node_local(params.ray.storage_path):
        return (f"ray.storage_path {params.ray.storage_path!r} is a folder on each node, but the cluster at {cluster} "
                f"has {nodes} nodes: checkpoints written on one would be missing on the others; use storage every "
                f"node reaches, e.g. s3://bucket/runs")
    if nodes > 1 and is_node_local(tracking_uri):
        return (f"mlflow.tracking_uri {redact(tracking_uri)} is a database on each node, but the cluster at {cluster} "
                f"has {nodes} nodes: workers elsewhere would log to databases of their own; use an MLflow server, "
                f"e.g. http://host:5000")
    return None


def check_resources(params: Params, tracking_uri: str) -> None:
    """Fail in one line, before any work, on a run that the Ray it would run on cannot take:
    this machine's, or the cluster it joins (joined here for the purpose: a second or so)."""
    if cluster_address(params):
        start_ray(params)
        found = {"cluster": ray.get_runtime_context().gcs_address, "capacity": cluster_capacity(),
                 "nodes": sum(node["Alive"] for node in ray.nodes())}
    else:
        found = {"cluster": None, "nodes": 1, "capacity": {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}}
    if problem := resource_problem(params, tracking_uri, **found):
        raise ConfigError(problem)


def cluster_capacity() -> dict[str, float]:
    """The resources of the joined cluster's nodes, or, where an autoscaler may add nodes, the
    most its node groups allow (read as Ray Train reads it before it asks for workers)."""
    now = ray.cluster_resources()
    most = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    return {key: max(now.get(key, 0), most.get(key, 0)) for key in now.keys() | most.keys()}


def start_ray(params: Params, *, sweep: bool = False) -> None:
    """Join the cluster of `cluster_address`, or start a local Ray. Its dashboard (on loopback
    only) starts if `ray.dashboard`, and always for a `sweep`: when Tune stops a trial early its
    Train controller dies with the trial, and only the placement-group cleaner, through the
    dashboard's state API, sees that and frees the trial's CPUs for the next one."""
    if ray.is_initialized():
        return
    address = cluster_address(params)
    local = address is None
    dashboard_port = None
    if local:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        # This process imported Ray before it knew the run is local: tell its copy too.
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = os.environ[LOOPBACK_ONLY_ENV_VAR] != "0"
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
    hook = ("set_up_worker" if not local else "set_up_local_worker" if dashboard
            else "set_up_local_worker_without_dashboard")
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
    raise_on_sigterm()
    if not local:
        release_orphaned_placement_groups()


def release_orphaned_placement_groups() -> None:
    """Remove the placement groups that jobs which have ended left on the joined cluster, saying
    what that frees. A non-detached placement group must end with its job, but Ray 2.60 kept one
    alive, holding a CPU forever, when a sweep's driver was killed with a trial starting: every
    later run that needed that CPU waited for it without end (RELIABILITY.md). Needs the
    cluster's dashboard (Ray's state API); without one, nothing is touched."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_jobs, list_placement_groups
    from ray.util.state.exception import RayStateApiException

    try:
        ended = {job.job_id for job in list_jobs(limit=10_000) if job.job_id and job.status.is_terminal()}
        orphans = [group for group in list_placement_groups(detail=True, limit=10_000, raise_on_missing_output=False)
                   if group.state != "REMOVED" and not group.is_detached and group.creator_job_id in ended]
    except RayStateApiException:
        return
    for group in orphans:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group.placement_group_id))))
    if orphans:
        cpus = sum(bundle.get("unit_resources", {}).get("CPU", 0) for group in orphans for bundle in group.bundles)
        print(f"released {len(orphans)} placement group(s) that ended jobs had left on the cluster "
              f"({cpus:g} CPU(s))", flush=True)


def resolve_storage_path(params: Params) -> str:
    """Ray storage for checkpoints and run state: a URI as given, a local path made absolute."""
    path = params.ray.storage_path
    return path if "://" in path else str(Path(path).resolve())


def worker_resources(params: Params) -> dict[str, float]:
    """What one Train worker holds: a CPU, and with `train.use_gpu` a GPU or a share of one."""
    return {"CPU": 1, "GPU": params.train.gpus_per_worker} if params.train.use_gpu else {"CPU": 1}


def build_trainer(params: Params, data: ray.ObjectRef, tracking_uri: str, run_id: str, *, name: str,
                  storage_path: str, callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """The one TorchTrainer of the pipeline, for a training run and for each sweep trial: the
    worker loop on `train.num_workers` workers (a fixed group, or an elastic range), with the
    prepared arrays in the object store, logging to MLflow run `run_id`."""
    fewest, most = params.train.worker_range
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params.model_dump(), "data": data, "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=most if fewest == most else (fewest, most),
                                               use_gpu=params.train.use_gpu, resources_per_worker=worker_resources(params),
                                               elastic_resize_monitor_interval_s=params.train.elastic_resize_seconds),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            failure_config=ray.train.FailureConfig(max_failures=params.train.max_failures),
            logging_config=RAY_TRAIN_LOGGING,
            callbacks=[EpochLogger(tracking_uri, run_id), *(callbacks or [])],
        ),
    )


def root_cause(error: BaseException) -> str:
    """The innermost error a worker raised, as one line: type and message."""
    failures = getattr(error, "worker_failures", None) or {}
    error = next(iter(failures.values()), error)
    while getattr(error, "cause", None) is not None:  # RayTaskError wraps the worker's exception
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
