"""The model registry's rules, shared by `register` (and the sweep's) and `predict`.

Promotion holds under concurrent registrations (a sweep and a `dvc repro` at once): each
registration scores its version first, then points `champion` at the best-scored version and
reads again, until what it read before writing is still true after. A registration that read
before another's score landed sees it on that second read and corrects the alias, so the best
model ends as champion whichever writes last. A champion without a numeric score (moved by
hand) is left where it is.

Integrity: at registration each version records the sha256 of its model's files, as the
artifact store holds them, in the tracking store (a different system, often a different
owner). `predict` downloads the files, compares, and loads only a match, from that same
download, with MLflow's pickle deserialisation off: a model swapped in the artifact store, or
one that would run pickled code, is refused before any of it runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow.artifacts
import mlflow.pytorch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from pipeline.common import StageError

CHAMPION = "champion"
TEST_ACCURACY_TAG = "test_accuracy"
MODEL_DIGEST_TAG = "model_sha256"
PROMOTION_ROUNDS = 20
MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


def champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)  # MLflow gives str or int
    except MlflowException:
        return None


def scored_versions(client: MlflowClient, name: str) -> dict[str, float]:
    """{version: test accuracy} of the versions whose accuracy tag is a finite number."""
    scores = {}
    for version in client.search_model_versions(f"name = '{name}'"):
        try:
            score = float(version.tags.get(TEST_ACCURACY_TAG, "nan"))
        except ValueError:
            continue
        if math.isfinite(score):
            scores[str(version.version)] = score
    return scores


def settle_champion(client: MlflowClient, name: str) -> str | None:
    """Point `champion` at the best-scored version (a tie keeps the champion; else the earlier
    version wins) and return it, or leave an unscored champion alone and return it. Repeats
    until the scores and the alias read after the write are those read before it."""
    for _ in range(PROMOTION_ROUNDS):
        scores, current = scored_versions(client, name), champion_version(client, name)
        if current is not None and current not in scores:
            return current
        best = min(scores, key=lambda version: (-scores[version], version != current, int(version)))
        if best != current:
            try:
                client.set_registered_model_alias(name, CHAMPION, best)
            except MlflowException:
                # Another registration set the alias at the same moment (the server's insert
                # lost the race, seen as a UNIQUE constraint failure): read again.
                continue
        if scored_versions(client, name) == scores and champion_version(client, name) == best:
            return best
    raise StageError(f"{name}: the champion alias kept changing under other registrations for {PROMOTION_ROUNDS} "
                     f"rounds; register again")


def folder_digest(folder: Path) -> str:
    """sha256 over every file's path and contents: a file changed, added or removed changes it."""
    digest = hashlib.sha256()
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        file_digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                file_digest.update(chunk)
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + file_digest.digest())
    return digest.hexdigest()


@contextmanager
def downloaded_version(name: str, version: str) -> Iterator[Path]:
    """The registered version's model files, downloaded into a folder removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="resattn-model-") as folder:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=folder))


def record_digest(client: MlflowClient, name: str, version: str) -> str:
    """Tag the version with the digest of its files as the artifact store now holds them."""
    with downloaded_version(name, version) as files:
        digest = folder_digest(files)
    client.set_model_version_tag(name, version, MODEL_DIGEST_TAG, digest)
    return digest


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    """models:/<name>@<alias> or models:/<name>/<version> -> its ModelVersion."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise StageError(f"--model {uri}: give a registered model, models:/<name>@<alias> or models:/<name>/<version>; "
                         f"only registered versions carry the digest that is checked before loading")
    name = match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException as error:
        raise StageError(f"cannot find {uri}: {error.message}. Run `dvc repro` to register a model first") from None


@contextmanager
def pickle_deserialisation_off() -> Iterator[None]:
    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous


def load_verified_model(client: MlflowClient, uri: str) -> nn.Module:
    """The registered model at `uri`, loaded only if its files are those registered, and only
    as a graph (torch.export): MLflow refuses any pickled part."""
    version = resolve_version(client, uri)
    label = f"{version.name} version {version.version}"
    expected = version.tags.get(MODEL_DIGEST_TAG)
    if not expected:
        raise StageError(f"{label} has no {MODEL_DIGEST_TAG} tag (registered before digests were recorded, or "
                         f"the tag was removed), so its files cannot be checked: register the model again")
    with downloaded_version(version.name, str(version.version)) as files:
        actual = folder_digest(files)
        if actual != expected:
            raise StageError(f"{label}: its files in the artifact store are not those registered (sha256 "
                             f"{actual[:16]}..., registered {expected[:16]}...); refusing to load them. Something "
                             f"changed the model after registration: register it again from a trusted run")
        try:
            with pickle_deserialisation_off():
                return mlflow.pytorch.load_model(str(files), map_location="cpu")
        except MlflowException as error:
            # MLflow's message goes on to suggest allowing pickle, which predict never does.
            raise StageError(f"{label}: refused to load: {error.message.split('. ')[0]}. predict loads only the "
                             f"torch.export (pt2) models that register logs, which run no pickled code") from None
