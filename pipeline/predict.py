"""Classify image files with a registered model (default: the champion), loaded only if its
files are those registered (pipeline/registry.py).

    python -m pipeline.predict cat.png truck.jpg [--model models:/resattn-cifar10@champion]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from pipeline.common import StageError
from pipeline.config import ConfigError, load_params
from pipeline.ray_hooks import quiet_libraries
from pipeline.registry import CHAMPION, load_verified_model
from pipeline.tracking import resolve_tracking_uri
from resattn.cifar10 import CLASSES
from resattn.inference import load_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files (resized to 32x32)")
    parser.add_argument("--model", help="model URI (default: models:/<registered_model>@champion)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    quiet_libraries()  # stdout is the predictions; MLflow's notes stay out of stderr too
    try:
        params = load_params(args.params)
        batch = load_images(args.images)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    uri = args.model or f"models:/{params.mlflow.registered_model}@{CHAMPION}"
    try:
        model = load_verified_model(MlflowClient(tracking_uri), uri)
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    with torch.no_grad():
        probabilities = model(batch)
    for path, probs in zip(args.images, probabilities):
        best = int(probs.argmax())
        print(f"{path}\t{CLASSES[best]}\t{probs[best]:.3f}")


if __name__ == "__main__":
    main()
