"""Set-up hooks that every Ray worker process of a run calls before its first task.

Kept free of torch and of the pipeline's other modules on purpose: a hook runs before Ray tells
the worker how many CPUs it holds, and a library loaded here would fix its thread count to
the machine's cores (pipeline.worker.use_reserved_cpus undoes that in the training thread).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

# Train V2's placement-group cleaner asks the dashboard's state API every second whether the
# controller is alive and, with no dashboard, warns every second. It frees a run's CPUs only if
# the controller dies while Ray lives on; in a training stage the controller lives as long as
# the driver that owns the local Ray, so nothing is lost by its silence.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


# Train V2's controller asks the AutoscalingCoordinator for its workers' resources every 20 s
# and, when an answer takes over 5 s, warns with a traceback that it is "safe to ignore if
# transient". On a busy 2-core machine it did, in a stage's console. A local Ray has no
# autoscaler to ask, so the warning says nothing there.
AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


# Reading an earlier run (pipeline.checkpoints.latest_state) logs at INFO that a snapshot
# was found, with advice for starting afresh that does not apply to a rerun.
CHECKPOINT_MANAGER_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


# Ray Train V2 logs every report, a multi-line dump of the metrics and the checkpoint, at INFO
# through a logger named after its file's path, which Train's own log-level setting misses.
REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def quiet_libraries() -> None:
    """Library notes at WARNING, in this process and in those it starts: MLflow's (database
    tables created, system metrics started, ...; no download progress bars), Ray Train's
    per-report dump and its note on an earlier run's snapshot. Output lines reach a log file or
    a pipe as they are printed, not when a buffer fills."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow when it is imported
    # MLflow draws a progress bar for every artifact download (a registered model's files, to
    # check their digest): in a log file, a line of carriage returns for a second's work.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # for an mlflow already imported
    logging.getLogger(CHECKPOINT_MANAGER_LOGGER).setLevel(logging.WARNING)
    if spec := importlib.util.find_spec(REPORT_LOGGER_MODULE):
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)


def ask_own_cluster() -> None:
    """Point Ray's state API in this worker at the cluster the worker belongs to. Train V2's
    placement-group cleaner asks that API whether its run's controller lives; not told where,
    the API looks for "the" Ray of the machine: it failed with "Found multiple active Ray
    instances" beside another Ray (a second user's, a test's), or asked a cluster that `ray
    start` last recorded in /tmp/ray. A local Ray of the pipeline names its dashboard already
    (RAY_API_SERVER_ADDRESS, pipeline/cluster.py); any other is found through its GCS."""
    import ray  # loaded in every Ray worker already; imported here so that the driver need not

    if "RAY_API_SERVER_ADDRESS" not in os.environ:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def set_up_worker() -> None:
    """The hook of every Ray worker process of a run."""
    quiet_libraries()
    ask_own_cluster()


def errors_only(logger_name: str) -> None:
    """Let only errors through the named logger. A filter, not a level: Train's controller,
    once started (after this hook), configures the `ray.train` logger with dictConfig, which
    sets every logger below it back to NOTSET and keeps their filters. With a level, the
    autoscaling client's traceback reached a stage's console on a busy 2-core machine."""
    logging.getLogger(logger_name).addFilter(lambda record: record.levelno >= logging.ERROR)


def set_up_local_worker() -> None:
    """The same, for a local Ray: the autoscaling client is quiet too."""
    set_up_worker()
    errors_only(AUTOSCALING_CLIENT_LOGGER)


def set_up_local_worker_without_dashboard() -> None:
    """The same, for a local Ray without its dashboard: the placement-group cleaner is quiet too."""
    set_up_local_worker()
    errors_only(PLACEMENT_GROUP_CLEANER_LOGGER)
