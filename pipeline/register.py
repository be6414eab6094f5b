"""DVC stage `register`: log the model to MLflow, register it with the digest of its files,
and move `champion` only on improvement, safely beside concurrent registrations (the rules are
in pipeline/registry.py).

The logged model is self-contained: it normalises its input (float images in [0, 1]), carries
the resattn package as code, and pins its pip requirements (no slow inference of them).
Writes reports/register.json with the version and whether it became champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import PIL
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import resattn
from pipeline.common import MODEL_FILE, RUN_FILE, run_stage
from pipeline.config import Params
from pipeline.remote import check_tracking_server
from pipeline.evaluate import METRICS_FILE as EVAL_FILE, load_trained_model
from pipeline.registry import CHAMPION, TEST_ACCURACY_TAG, record_digest, scored_versions, settle_champion
from pipeline.tracking import resolve_tracking_uri
from resattn.data import Normalization, load_split, to_tensor_nchw, write_json
from resattn.inference import NormalizedClassifier

REGISTER_FILE = Path("reports/register.json")


def pip_requirements() -> list[str]:
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"pillow=={PIL.__version__}"]


def register_model(params: Params, model_path: Path, run_id: str, test_accuracy: float) -> dict:
    """Log `model_path` to the MLflow run, register it, and move `champion` to it only if its
    test accuracy beats the champion's. Returns what happened."""
    tracking_uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name = params.mlflow.registered_model

    prepared = Path(params.data.prepared_dir)
    classifier = NormalizedClassifier(load_trained_model(model_path), Normalization.load(prepared)).eval()
    # Two validation images (the test set is evaluate's alone): a batch of one would freeze
    # the batch size at 1.
    example = to_tensor_nchw(load_split(prepared / "val.npz").images[:2]).float().numpy() / 255
    with torch.no_grad():
        signature = infer_signature(example, classifier(torch.from_numpy(example)).numpy())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            classifier,
            name="model",
            signature=signature,
            input_example=example,
            serialization_format="pt2",  # a graph: loading it runs no pickled code (MLflow's default off Databricks)
            pip_requirements=pip_requirements(),
            code_paths=[str(Path(resattn.__file__).parent)],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    record_digest(client, name, version)
    client.set_model_version_tag(name, version, TEST_ACCURACY_TAG, str(test_accuracy))

    champion = settle_champion(client, name)
    champion_accuracy = scored_versions(client, name).get(champion)
    promoted = champion == version
    if promoted:
        verdict = f"now {CHAMPION}"
    elif champion_accuracy is None:
        verdict = (f"{CHAMPION} stays version {champion}, which has no numeric {TEST_ACCURACY_TAG} tag (moved by "
                   f"hand?); move the alias yourself if this version should replace it")
    else:
        verdict = f"{CHAMPION} stays version {champion} ({champion_accuracy:.4f} >= {test_accuracy:.4f})"
    print(f"registered {name} version {version} with test accuracy {test_accuracy:.4f}: {verdict}")
    return {
        "model": name, "version": int(version), "test_accuracy": test_accuracy, "promoted": promoted,
        "champion_version": int(champion), "champion_test_accuracy": champion_accuracy,
    }


def register(params: Params) -> None:
    check_tracking_server(params.mlflow.tracking_uri)
    run_id = json.loads(RUN_FILE.read_text())["run_id"]
    test_accuracy = json.loads(EVAL_FILE.read_text())["test_accuracy"]
    write_json(REGISTER_FILE, register_model(params, MODEL_FILE, run_id, test_accuracy))


if __name__ == "__main__":
    run_stage(__doc__, register)
