"""Shared fixtures: small datasets in the real CIFAR-10 file format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resattn.cifar10 import Split, write_cifar_format

REAL_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "cifar-10-batches-py"


def synthetic_split(n: int, seed: int) -> Split:
    """Images whose mean colour depends on the class, so a tiny net can learn something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    base = (labels[:, None, None, None] * 25).astype(np.int16)
    noise = rng.integers(-20, 21, size=(n, 32, 32, 3))
    images = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64))


@pytest.fixture
def small_cifar(tmp_path: Path) -> tuple[Path, Path]:
    """(folder, md5 list) of a 400/100-image dataset in the official format."""
    folder = tmp_path / "source" / "cifar-10-batches-py"
    checksums = write_cifar_format(folder, synthetic_split(400, 0), synthetic_split(100, 1))
    md5_list = tmp_path / "source" / "small.md5"
    md5_list.write_text("".join(f"{digest}  {name}\n" for name, digest in checksums.items()))
    return folder, md5_list
