"""Ray Train checkpoints of the pipeline: one file of training state per checkpoint folder.

Rank 0 writes `resattn.training.training_state` (or a divergence record) through
`report_state`; the next run of the same Ray run resumes from `load_resumable_state`, which
its driver calls first (`latest_state`), and the driver reads the final state with
`load_checkpoint_state` and keeps its weights as the model file (`save_trained_model`). The
trainer keeps two checkpoints (pipeline/cluster.py), so a truncated newest one falls back to
the one before it. Local or s3:// storage alike; loading never unpickles code (`weights_only`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs
import ray.train
import torch

from pipeline.config import Params
from resattn.model import model_config
from resattn.model_file import save_model
from resattn.training import trained_weights

STATE_FILE = "state.pt"
# The epoch count a run trains, kept beside its training state: a time budget chooses it once,
# and a resumed run keeps it (its schedule and resizing ramp were planned for it).
EPOCHS_KEY = "epochs"
CHECKPOINTS_KEPT = 2


def report_state(metrics: dict, state: dict | None) -> None:
    """Report this worker's metrics for the epoch, with `state` as the checkpoint if given
    (rank 0's; the other workers report metrics alone)."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> dict:
    """The state a worker saved, from local or s3:// storage; tensors and plain values only."""
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_resumable_state(latest: ray.train.Checkpoint) -> dict:
    """The state of the newest checkpoint that loads. A truncated or corrupted file is reported
    and skipped for the one kept before it; if none loads, the error names every file tried."""
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


def recorded_result(storage_path: str, run_name: str) -> ray.train.Result | None:
    """What Ray Train recorded of run `run_name`: its latest checkpoint, with the metrics
    reported beside it; None if there is no such run or it has no checkpoint yet."""
    try:
        result = ray.train.Result.from_path(f"{storage_path.rstrip('/')}/{run_name}")
    except RuntimeError:  # no such run, or no checkpoint recorded yet
        return None
    return result if result.checkpoint else None


def latest_state(storage_path: str, run_name: str) -> dict | None:
    """The state of Ray run `run_name`'s newest readable checkpoint (`load_resumable_state`), or
    None if there is no such run or it has no checkpoint yet; RuntimeError if none loads. The
    driver reads it before Ray starts: a concluded run (`has_concluded`) needs no Ray, and a
    run that cannot resume fails in seconds, where Ray Train restarted its workers
    `train.max_failures` times to fail the same way."""
    result = recorded_result(storage_path, run_name)
    return load_resumable_state(result.checkpoint) if result else None


def has_concluded(state: dict, epochs: int) -> bool:
    """Whether a checkpoint's state ends its run: all its epochs trained (the count it keeps,
    else `epochs`), or a divergence record."""
    return "diverged" in state or state["epoch"] + 1 == state.get(EPOCHS_KEY, epochs)


def save_trained_model(state: dict, params: Params, path: Path) -> None:
    """The final weights of a training state (a training run's, or a sweep's best trial's), its
    weight average's if it keeps one, as a model file (resattn.model_file)."""
    save_model(path, trained_weights(state), model_config(params.model.preset, **params.model.build_kwargs()),
               preset=params.model.preset)
