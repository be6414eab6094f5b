"""CIFAR-10, python version: fetch, verify and decode without trusting the files.

The official files are Python-2 pickles, and a pickle can run code. So every file's md5 is
checked against the official list before it is opened, and decoding goes through an unpickler
that allows only the three numpy globals these files contain. Fetching is atomic: files land in
a temporary folder beside the destination and are moved into place only once all are verified.

Sources: a local folder holding the files, a local `.tar.gz`, an http(s) URL of the tarball,
or an `s3://bucket/key` of either (boto3, imported only for s3 sources).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy._core.multiarray import _reconstruct as _numpy_reconstruct

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_TARBALL_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER_NAME = "cifar-10-batches-py"
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
# Each file's largest size: the official batches are 31.04 MB (10,000 images), the class names
# 158 bytes. A source whose files are larger is not CIFAR-10; it is refused before it is copied
# (a sparse member of a tarball makes gigabytes cheap to send).
MAX_FILE_BYTES = {name: 32 * 2**20 for name in OFFICIAL_MD5} | {"batches.meta": 64 * 2**10}
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SIZE = 32  # pixels a side
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SOURCE_ENV_VAR = "RESATTN_CIFAR10_SOURCE"


class DataError(RuntimeError):
    """Bad or unreachable data; the message says which file or source and what to do."""


# Query parameters that carry credentials in the URLs people paste: presigned S3 and Azure SAS
# URLs, API tokens.
SECRET_QUERY_KEYS = frozenset({
    "token", "access_token", "auth", "apikey", "api_key", "key", "password", "secret", "client_secret", "sig",
    "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "x-goog-signature",
    "x-goog-credential",
})


def secret_parts(uri: str) -> list[str]:
    """What in `uri` is a credential: its user:password part, its secret query parameters."""
    parts = urllib.parse.urlsplit(uri)
    found = ["user:password"] if parts.username is not None or parts.password is not None else []
    found += [key for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
              if key.lower() in SECRET_QUERY_KEYS]
    return found


def redact(uri: str) -> str:
    """`uri` as it may be printed, raised or logged: without its user:password part, and with
    the value of every secret query parameter replaced by ***."""
    parts = urllib.parse.urlsplit(uri)
    if not secret_parts(uri):
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = urllib.parse.urlencode([(key, "***" if key.lower() in SECRET_QUERY_KEYS else value) for key, value
                                    in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_text(text: str, uri: str) -> str:
    """`text` (an error's message, say) with `uri` redacted in it, and each of its secrets too,
    wherever else they appear."""
    parts = urllib.parse.urlsplit(uri)
    secrets = [parts.password] + [value for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
                                  if key.lower() in SECRET_QUERY_KEYS]
    text = text.replace(uri, redact(uri))
    for secret in filter(None, secrets):
        text = text.replace(secret, "***").replace(urllib.parse.quote(secret, safe=""), "***")
    return text


# --------------------------------------------------------------------------------------------
# Checksums


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_md5_list(path: Path) -> dict[str, str]:
    """An `md5sum`-format list ("<hash>  <file>" per line), for datasets in the CIFAR format."""
    checksums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 32:
            raise DataError(f"{path}:{number}: expected '<md5>  <file name>', got {line!r}")
        checksums[parts[1].lstrip("*")] = parts[0].lower()
    missing = sorted(set(OFFICIAL_MD5) - set(checksums))
    if missing:
        raise DataError(f"{path} lists no checksum for {', '.join(missing)}")
    return checksums


def verify_folder(folder: Path, checksums: Mapping[str, str] = OFFICIAL_MD5, origin: str | None = None) -> None:
    """Raise DataError unless every expected file is present with its expected md5; messages
    name files under `origin` (where they came from) if given."""
    for name in OFFICIAL_MD5:
        path = Path(folder) / name
        shown = f"{origin.rstrip('/')}/{name}" if origin else str(path)
        if not path.is_file():
            raise DataError(f"{shown} is missing; a CIFAR-10 folder holds {', '.join(OFFICIAL_MD5)}")
        actual = md5_of(path)
        if actual != checksums[name]:
            raise DataError(
                f"checksum mismatch for {shown}: expected md5 {checksums[name]}, got {actual} "
                f"(size {path.stat().st_size:,} bytes). The file is truncated, corrupted or not "
                f"CIFAR-10; delete it and fetch again from a trusted source"
            )


# --------------------------------------------------------------------------------------------
# Fetching


def _check_size(name: str, size: int, origin: str) -> None:
    if size > MAX_FILE_BYTES[name]:
        raise DataError(f"{origin}: {name} is {size:,} bytes, but CIFAR-10's is at most {MAX_FILE_BYTES[name]:,}; "
                        f"this is not CIFAR-10 (refused before copying it)")


def _disk_full(error: OSError, where: Path) -> DataError | None:
    """The error to raise for a full disk at `where`, or None for any other OSError."""
    if error.errno != errno.ENOSPC:
        return None
    where = next(folder for folder in (where, *where.parents) if folder.exists())
    return DataError(f"no space left on the disk of {where} ({shutil.disk_usage(where).free / 1e6:,.0f} MB free; "
                     f"CIFAR-10 needs about 180 MB, twice that while fetching a tarball): free some space, or set "
                     f"data.raw_dir to a folder on another disk")


def _copy_member_files(tar: tarfile.TarFile, destination: Path, origin: str) -> None:
    # Extract only the expected regular files by name: no path from the archive is trusted.
    members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile() and Path(m.name).name in OFFICIAL_MD5}
    missing = sorted(set(OFFICIAL_MD5) - set(members))
    if missing:
        raise DataError(f"{origin} does not contain {', '.join(missing)}; is it the CIFAR-10 python version?")
    for name, member in members.items():
        _check_size(name, member.size, origin)
    for name, member in members.items():
        source = tar.extractfile(member)
        with source, open(destination / name, "wb") as target:
            shutil.copyfileobj(source, target)


def _unpack_tarball(tarball: Path, destination: Path, origin: str) -> None:
    try:
        with tarfile.open(tarball, "r:*") as tar:
            _copy_member_files(tar, destination, origin)
    except (tarfile.TarError, EOFError, OSError) as error:
        if isinstance(error, OSError) and (full := _disk_full(error, destination)):
            raise full from error
        raise DataError(f"{origin} is not a readable .tar.gz ({error}); fetch it again") from error


def _progress_printer(label: str, total: int | None) -> Callable[[int], None]:
    started = time.monotonic()
    last = [0.0]

    def report(done: int) -> None:
        now = time.monotonic()
        if now - last[0] < 1.0 and done != total:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9) / 1e6
        share = f" {100 * done / total:5.1f}% of {total / 1e6:.1f} MB" if total else ""
        print(f"\r{label}: {done / 1e6:7.1f} MB{share} at {rate:.1f} MB/s", end="", file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)

    return report


def http_request(url: str, login: tuple[str, str] | None = None) -> urllib.request.Request:
    """A request for `url` with its user:password part (else `login`) as HTTP basic
    authentication: urllib would take the user:password for part of the host name."""
    parts = urllib.parse.urlsplit(url)
    request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    if parts.username is not None:
        login = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    if login is not None:
        request.add_header("Authorization", f"Basic {base64.b64encode(':'.join(login).encode()).decode()}")
    return request


def _download(url: str, target: Path, timeout: float = 60.0) -> None:
    """`url` into `target`. A user:password in it (from the environment: params refuse it) is
    sent as HTTP basic authentication, never printed."""
    request = http_request(url)
    shown = redact(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            report = _progress_printer(f"downloading {shown}", total)
            done = 0
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                report(done)
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as error:
        if isinstance(error, OSError) and (full := _disk_full(error, target.parent)):
            raise full from error
        raise DataError(
            f"could not download {shown}: {redact_text(str(error), url)}. On a machine without internet, point the "
            f"{SOURCE_ENV_VAR} environment variable (or data.source in params.yaml) at a local "
            f"folder or tarball of CIFAR-10, or at an s3:// copy"
        ) from error


def _download_s3(uri: str, target: Path, *, cifar_file: bool = False) -> None:
    """`uri` into `target`; a `cifar_file` (named as `target` is) larger than CIFAR-10's is
    refused before the download."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        # Endpoint and credentials come from the standard chain (AWS_ENDPOINT_URL_S3 for
        # S3-compatible stores, AWS_* variables, ~/.aws, instance profiles).
        client = boto3.client("s3")
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if cifar_file:
            _check_size(target.name, size, uri)
        report = _progress_printer(f"downloading {uri}", size)
        done = [0]

        def callback(chunk: int) -> None:
            done[0] += chunk
            report(done[0])

        client.download_file(bucket, key, str(target), Callback=callback)
    except (BotoCoreError, ClientError) as error:
        raise DataError(
            f"could not read {uri}: {error}. Check the bucket and key, and that AWS credentials "
            f"are available through the standard chain (environment, ~/.aws, instance profile)"
        ) from error


def _fetch_into(source: str, staging: Path) -> None:
    if source.startswith(("http://", "https://")):
        tarball = staging / "download.tar.gz"
        _download(source, tarball)
        if source == OFFICIAL_URL and (actual := md5_of(tarball)) != OFFICIAL_TARBALL_MD5:
            raise DataError(f"checksum mismatch for {source}: expected md5 {OFFICIAL_TARBALL_MD5}, got {actual}")
        _unpack_tarball(tarball, staging, redact(source))
        tarball.unlink()
    elif source.startswith("s3://"):
        if source.endswith((".tar.gz", ".tgz", ".tar")):
            tarball = staging / "download.tar.gz"
            _download_s3(source, tarball)
            _unpack_tarball(tarball, staging, source)
            tarball.unlink()
        else:
            for name in OFFICIAL_MD5:
                _download_s3(f"{source.rstrip('/')}/{name}", staging / name, cifar_file=True)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            for name in OFFICIAL_MD5:
                if not (path / name).is_file():
                    raise DataError(f"{path} has no file {name}; a CIFAR-10 folder holds {', '.join(OFFICIAL_MD5)}")
                _check_size(name, (path / name).stat().st_size, str(path))
                shutil.copyfile(path / name, staging / name)
        elif path.is_file():
            _unpack_tarball(path, staging, str(path))
        else:
            raise DataError(
                f"data source {source!r} is neither a URL, an s3:// URI, a folder nor a file. Set "
                f"data.source in params.yaml or the {SOURCE_ENV_VAR} environment variable"
            )


def fetch(source: str, destination: Path, checksums: Mapping[str, str] = OFFICIAL_MD5) -> Path:
    """Bring the seven CIFAR-10 files from `source` into `destination`, verified, atomically.

    On any failure `destination` is left as it was and no temporary file remains.
    """
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    except OSError as error:
        raise _disk_full(error, destination.parent) or error
    try:
        _fetch_into(source, staging)
        verify_folder(staging, checksums, origin=redact(source))
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except OSError as error:
        raise _disk_full(error, destination.parent) or error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


# --------------------------------------------------------------------------------------------
# Decoding


class _ArrayType:
    """What a CIFAR-10 file gets for the global numpy.ndarray: only a token for `_reconstruct`'s
    first argument. Called itself, numpy.ndarray(shape, dtype, buffer, offset, strides) makes a
    view of any shape over a few bytes (zero strides), which a later copy turns into gigabytes."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray(...) called directly is not allowed in a CIFAR-10 file")


ARRAY_TYPE = _ArrayType()
# The dtypes the official files use: bytes, as the arrays are created, and unsigned bytes.
ALLOWED_DTYPES = frozenset({"b", "u1", "i1", "uint8", "int8"})


def _reconstruct(subtype, shape, dtype):
    """numpy's `_reconstruct(ndarray, (0,), b"b")`, which the official files use to start an
    empty array whose state (shape, dtype, bytes) comes next: numpy then checks the bytes
    against the shape, so the array is never larger than the file."""
    if subtype is not ARRAY_TYPE or shape != (0,):
        raise pickle.UnpicklingError(f"numpy _reconstruct({subtype!r}, {shape!r}) is not how CIFAR-10 files start "
                                     f"an array")
    return _numpy_reconstruct(np.ndarray, shape, _dtype(dtype))


def _dtype(spec, align=False, copy=True):
    text = spec.decode("latin-1") if isinstance(spec, bytes) else spec
    if text not in ALLOWED_DTYPES:
        raise pickle.UnpicklingError(f"dtype {text!r} is not one of a CIFAR-10 file's ({', '.join(sorted(ALLOWED_DTYPES))})")
    return np.dtype(text, align, copy)


class _CifarUnpickler(pickle.Unpickler):
    """Allows only the numpy globals that the official files reference, each bounded to the use
    those files make of it."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "ndarray"):
            return ARRAY_TYPE
        if (module, name) == ("numpy", "dtype"):
            return _dtype
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return _reconstruct
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DataError(f"{path} is not a valid CIFAR-10 pickle: {error}") from error
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a {type(content).__name__}, not the CIFAR-10 dict")
    return content


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, 32, 32, 3): NHWC
    labels: np.ndarray  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)


def _decode_batch(path: Path) -> Split:
    content = _unpickle(path)
    try:
        data, labels = content[b"data"], content[b"labels"]
    except KeyError as error:
        raise DataError(f"{path} lacks the key {error.args[0]!r}") from error
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: images must be uint8 of shape (N, 3072); got {type(data).__name__} {shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{path}: labels must lie in 0..{len(CLASSES) - 1}; found {labels.min()}..{labels.max()}")
    # Rows are 1024 red, 1024 green, 1024 blue values: (N, 3, 32, 32) -> NHWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    return Split(images, labels)


def load(folder: Path, checksums: Mapping[str, str] = OFFICIAL_MD5) -> tuple[Split, Split]:
    """(train, test) from a CIFAR-10 folder, verifying every checksum before any unpickling."""
    folder = Path(folder)
    verify_folder(folder, checksums)
    meta = _unpickle(folder / META_FILE)
    names = tuple(name.decode() for name in meta.get(b"label_names", []))
    if names != CLASSES:
        raise DataError(f"{folder / META_FILE}: class names {names} are not CIFAR-10's {CLASSES}")
    batches = [_decode_batch(folder / name) for name in TRAIN_FILES]
    train = Split(np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]))
    return train, _decode_batch(folder / TEST_FILE)


def write_cifar_format(folder: Path, train: Split, test: Split) -> dict[str, str]:
    """Write a dataset in the official file format; returns its md5 list (for tests and demos).

    Protocol 3 rather than the originals' Python-2 protocol 2: Python 3 can only write bytes at
    protocol 2 through `_codecs.encode`, which the safe unpickler rightly refuses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, split: Split) -> None:
        rows = split.images.transpose(0, 3, 1, 2).reshape(len(split), 3072)
        content = {
            b"batch_label": name.encode(),
            b"labels": [int(label) for label in split.labels],
            b"data": np.ascontiguousarray(rows, dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(split))],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(content, f, protocol=3)

    for index, part in enumerate(np.array_split(np.arange(len(train)), len(TRAIN_FILES))):
        dump(TRAIN_FILES[index], Split(train.images[part], train.labels[part]))
    dump(TEST_FILE, test)
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f, protocol=3)
    return {name: md5_of(folder / name) for name in OFFICIAL_MD5}

