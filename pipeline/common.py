"""What every stage entry point shares: argument parsing and clean failure."""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from pipeline.ray_hooks import quiet_libraries
from resattn.cifar10 import DataError
from resattn.data import write_bytes


# What the train stage hands to evaluate and register.
MODEL_FILE = Path("models/model.pt")
RUN_FILE = Path("models/mlflow_run.json")


def save_figure(figure, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    write_bytes(path, buffer.getvalue())


class StageError(RuntimeError):
    """A stage failed for a reason its message states in full (no traceback adds anything)."""


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def raise_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does. (ray.init installs
    a handler of its own, a bare exit: this is called again after it.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`, the end of the `dvc repro` that runs this stage) stops the
    stage as Ctrl-C does: the interrupt unwinds it, and its local Ray shuts down with it.
    Python's default would end it at once and leave Ray's processes running. On Linux the stage
    also asks for SIGTERM when its parent dies, so that it does not train on, with its Ray,
    after a `dvc repro` killed over it (DVC dies at once on SIGTERM and passes nothing on; its
    parent is DVC itself because dvc.yaml `exec`s each stage)."""
    raise_on_sigterm()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def failing_in_one_line() -> Iterator[None]:
    """Expected failures exit 1 with their message; SIGTERM or Ctrl-C exits with Ctrl-C's
    status and one line (stop_on_sigterm is asked for here)."""
    stop_on_sigterm()
    try:
        yield
    except (ConfigError, DataError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        shut_down_ray()
        print("stopped (SIGTERM or Ctrl-C); rerun the same command to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None


def shut_down_ray() -> None:
    """Leave the Ray this process started or joined, now rather than at interpreter exit. A
    SIGTERM to the stage's whole process group (`kill -- -PGID`, a batch scheduler) reaches the
    local Ray's own processes too, and its GCS, once signalled, stops answering without exiting:
    at exit, Tune's handler that unregisters a sweep's trainables from the GCS ran first and
    waited on it for good (a sweep's driver, its Ray and its trial workers were still there
    60 s later), where shutting down first drops that registry and stops the processes."""
    ray = sys.modules.get("ray")  # imported by the stages that use Ray only
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def change_to_root(root: Path | None) -> None:
    """`--root`: the project directory that relative paths in params refer to. A Ray job runs
    in an uploaded copy of the code, without the data and outputs."""
    if root is None:
        return
    if not root.is_dir():
        print(f"error: --root {root} is not a directory on this node", file=sys.stderr)
        raise SystemExit(1)
    os.chdir(root)


def run_stage(description: str, stage: Callable[[Params], None], argv: list[str] | None = None) -> None:
    """Parse `--params` (and `--root`), validate them, run `stage`; expected failures exit 1
    with one message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--root", type=Path, help="project directory to run in (default: the current one); "
                        "for a stage submitted as a Ray job: --root $PWD")
    args = parser.parse_args(argv)
    change_to_root(args.root)
    quiet_libraries()
    with failing_in_one_line():
        stage(load_params(args.params))
