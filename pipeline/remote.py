"""The remote services a run depends on, checked in seconds before any expensive work.

An s3:// location (Ray storage, a data source) needs credentials from the standard AWS chain,
a reachable endpoint and an existing bucket; an http(s) MLflow tracking URI needs a server that
answers. Each problem becomes one ConfigError that names the setting, the location and what to
do, instead of a stack trace after an hour of training. Messages name locations only: never a
credential, and never the user:password part of a URI.

S3-compatible stores (MinIO, Ceph, moto) are reached through the standard AWS_ENDPOINT_URL
(or AWS_ENDPOINT_URL_S3) variable, which boto3, DVC's s3fs, pyarrow (Ray storage) and the
MLflow server all read: one setting for every tool.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from pipeline.config import ConfigError, Params
from resattn.cifar10 import http_request, redact, redact_text

CREDENTIAL_HELP = (
    "provide them through the standard AWS chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE with ~/.aws/credentials, or an instance profile / IRSA role), never in params.yaml"
)


def check_s3_location(setting: str, uri: str) -> None:
    """The bucket of `uri` exists and these credentials may list it."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError

    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"{setting} {uri!r} names no bucket; use s3://bucket/prefix")
    # A fresh session: the default one caches credentials from its first use.
    client = boto3.session.Session().client(
        "s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
    endpoint = redact(client.meta.endpoint_url)
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise ConfigError(f"{setting} {uri}: no AWS credentials found; {CREDENTIAL_HELP}") from None
    except (EndpointConnectionError, ConnectTimeoutError):
        raise ConfigError(
            f"{setting} {uri}: cannot reach the S3 endpoint {endpoint}; check the network, and "
            f"AWS_ENDPOINT_URL for an S3-compatible store"
        ) from None
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.response.get("Error", {}).get("Code", "")
        if status == 404 or code == "NoSuchBucket":
            raise ConfigError(
                f"{setting} {uri}: bucket {bucket!r} does not exist at {endpoint}; create it with "
                f"`python infra/bootstrap.py` or fix the bucket name"
            ) from None
        if status in (400, 401, 403):
            raise ConfigError(
                f"{setting} {uri}: {endpoint} refused the credentials for bucket {bucket!r} (HTTP {status}): "
                f"the keys are wrong or expired, or lack s3:ListBucket on it; {CREDENTIAL_HELP}"
            ) from None
        raise ConfigError(f"{setting} {uri}: S3 error {code or status} from {endpoint}") from None


def check_tracking_server(uri: str) -> None:
    """An http(s) MLflow tracking URI answers its health check (local stores need no check),
    asked with the credentials MLflow itself would send: the URI's user:password, else
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    if not uri.startswith(("http://", "https://")):
        return
    shown = redact(uri)
    username, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    login = (username, password or "") if username else None
    try:
        with urllib.request.urlopen(http_request(f"{uri.rstrip('/')}/health", login), timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as error:
        advice = ("; check its credentials (user:password in the URI, or MLFLOW_TRACKING_USERNAME and "
                  "MLFLOW_TRACKING_PASSWORD)" if error.code in (401, 403) else "")
        raise ConfigError(f"mlflow.tracking_uri {shown}: the server answered HTTP {error.code} to /health{advice}") \
            from None
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
        reason = redact_text(str(getattr(error, "reason", error)), uri)
        raise ConfigError(
            f"mlflow.tracking_uri {shown}: the MLflow server is unreachable ({reason}); start it "
            f"(python infra/local_stack.py up, for a local one) or fix the URI"
        ) from None


def check_run_services(params: Params) -> None:
    """What a training run or a sweep writes to: the tracking server and Ray storage."""
    check_tracking_server(params.mlflow.tracking_uri)
    if params.ray.storage_path.startswith("s3://"):
        check_s3_location("ray.storage_path", params.ray.storage_path)
