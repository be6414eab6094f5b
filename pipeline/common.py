"""What every stage entry point shares: argument parsing and clean failure."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from resattn.cifar10 import DataError


class StageError(RuntimeError):
    """A stage failed for a reason its message states in full (no traceback adds anything)."""


def run_stage(description: str, stage: Callable[[Params], None], argv: list[str] | None = None) -> None:
    """Parse `--params`, validate them, run `stage`; expected failures exit 1 with one message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        stage(load_params(args.params))
    except (ConfigError, DataError, StageError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
