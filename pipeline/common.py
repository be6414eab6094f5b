"""What every stage entry point shares: argument parsing and clean failure."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable
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
    try:
        stage(load_params(args.params))
    except (ConfigError, DataError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
