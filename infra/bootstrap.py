"""Create the project's S3 buckets, idempotently, and print the settings that use them.

    python infra/bootstrap.py --prefix acme-resattn [--checkpoint-days 30]

Three buckets, each private (public access blocked) and encrypted at rest (SSE-S3):
  <prefix>-data    the DVC remote: raw and prepared data, stage outputs. Versioned, so an
                   overwritten or deleted object can be recovered.
  <prefix>-mlflow  MLflow artifacts (models, plots), written only by the MLflow server.
  <prefix>-ray     Ray Train / Tune checkpoints and experiment state. Objects expire after
                   --checkpoint-days (old sweeps and runs are the bulk of storage cost).
Every bucket also aborts multipart uploads left incomplete for a day (a killed upload would
otherwise be billed forever). Running it again changes nothing that is already right.

Credentials and the endpoint come from the standard AWS chain (AWS_PROFILE, AWS_* variables,
instance profile; AWS_ENDPOINT_URL for S3-compatible stores), never from arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError

ROLES = ("data", "mlflow", "ray")
# S3 bucket names: 3-63 lowercase letters, digits and hyphens; the longest suffix is "-mlflow".
PREFIX_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{1,54}")


def bucket_names(prefix: str) -> dict[str, str]:
    return {role: f"{prefix}-{role}" for role in ROLES}


def _ensure_bucket(client, name: str, region: str) -> bool:
    """Create `name` unless this account owns it already; True if it was created."""
    try:
        client.head_bucket(Bucket=name)
        return False
    except ClientError as error:
        if error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
            raise
    kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    client.create_bucket(Bucket=name, **kwargs)
    return True


def _lifecycle(expire_days: int | None) -> dict:
    rules = [{"ID": "abort-incomplete-uploads", "Status": "Enabled", "Filter": {"Prefix": ""},
              "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]
    if expire_days:
        rules.append({"ID": "expire-old-checkpoints", "Status": "Enabled", "Filter": {"Prefix": ""},
                      "Expiration": {"Days": expire_days}})
    return {"Rules": rules}


def bootstrap(prefix: str, region: str, checkpoint_days: int) -> dict[str, str]:
    """Create and configure the buckets; returns role -> bucket name."""
    client = boto3.client("s3", region_name=region)
    names = bucket_names(prefix)
    for role, name in names.items():
        created = _ensure_bucket(client, name, region)
        client.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration={
            "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
        client.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
        if role == "data":
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        client.put_bucket_lifecycle_configuration(
            Bucket=name, LifecycleConfiguration=_lifecycle(checkpoint_days if role == "ray" else None))
        print(f"{'created' if created else 'checked'} s3://{name} ({role})", file=sys.stderr)
    return names


def access_policy(names: dict[str, str]) -> dict:
    """Least privilege for the cluster's nodes: read/write the data and Ray buckets. The MLflow
    bucket is the tracking server's alone (clients go through its HTTP API)."""
    arns = [f"arn:aws:s3:::{names[role]}" for role in ("data", "ray")]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"], "Resource": arns},
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                           "s3:AbortMultipartUpload"], "Resource": [f"{arn}/*" for arn in arns]},
        ],
    }


def settings(names: dict[str, str], endpoint: str | None) -> str:
    dvc_endpoint = f"\n  dvc remote modify storage endpointurl {endpoint}" if endpoint else ""
    return f"""\
DVC remote (data and stage outputs; `dvc push` / `dvc pull`):
  dvc remote add -d storage s3://{names['data']}/dvc{dvc_endpoint}
MLflow tracking server (clients need only HTTP access to it, not S3):
  mlflow server --backend-store-uri postgresql://USER@HOST/mlflow \\
    --artifacts-destination s3://{names['mlflow']}/artifacts --host 0.0.0.0 --port 5000
conf/config.yaml (or dvc exp run -S ...):
  mlflow.tracking_uri: http://MLFLOW_HOST:5000
  ray.storage_path: s3://{names['ray']}/runs
  data.source: s3://{names['data']}/cifar-10-python.tar.gz   # after uploading the tarball once
IAM policy for the Ray nodes' instance profile / service account:
{json.dumps(access_policy(names), indent=2)}"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True, help="bucket name prefix, e.g. acme-resattn (globally unique on AWS)")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    parser.add_argument("--checkpoint-days", type=int, default=30, help="expire Ray checkpoints after this many days (0: never)")
    args = parser.parse_args(argv)
    if not PREFIX_PATTERN.fullmatch(args.prefix):
        parser.error(f"--prefix {args.prefix!r} cannot start an S3 bucket name: use 2-55 lowercase letters, digits and hyphens")
    if args.checkpoint_days < 0:
        parser.error(f"--checkpoint-days must be 0 or more; got {args.checkpoint_days}")
    try:
        names = bootstrap(args.prefix, args.region, args.checkpoint_days)
    except (BotoCoreError, ClientError) as error:
        # botocore's messages name operations and buckets, never the secret key.
        print(f"error: could not set up the buckets with prefix {args.prefix!r}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(settings(names, os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")))


if __name__ == "__main__":
    main()
