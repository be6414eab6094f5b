"""DVC stage `fetch`: the seven CIFAR-10 files, verified, into data.raw_dir."""

from __future__ import annotations

from pathlib import Path

from pipeline.common import run_stage
from pipeline.config import Params
from resattn import cifar10


def checksums_for(params: Params) -> dict[str, str]:
    if params.data.checksums == "official":
        return cifar10.OFFICIAL_MD5
    return cifar10.read_md5_list(Path(params.data.checksums))


def fetch(params: Params) -> None:
    source = params.data.resolved_source()
    destination = Path(params.data.raw_dir) / cifar10.FOLDER_NAME
    print(f"fetching CIFAR-10 from {cifar10.redact(source)}")
    cifar10.fetch(source, destination, checksums_for(params))
    print(f"verified {len(cifar10.OFFICIAL_MD5)} files in {destination}")


if __name__ == "__main__":
    run_stage(__doc__, fetch)
