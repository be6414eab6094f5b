"""Prepared arrays, the train/validation split, and batched augmentation on tensors.

The prepared dataset is three `.npz` files (uint8 NHWC images, int64 labels) plus the training
split's per-channel mean and std. Training never touches PIL: a whole batch is padded, cropped,
flipped and normalised as tensors, which is what lets a 2-core machine feed the model.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from resattn.cifar10 import CLASSES, DataError, Split

SPLITS = ("train", "val", "test")
STATS_FILE = "stats.json"


def stratified_split(labels: np.ndarray, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with the same class proportions in both, fixed by `seed`."""
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 < validation_size < len(labels):
        raise ValueError(f"validation_size must be between 1 and {len(labels) - 1}; got {validation_size}")
    rng = np.random.default_rng(seed)
    # Largest-remainder apportionment: per-class quotas that sum exactly to validation_size.
    exact = counts * validation_size / len(labels)
    quotas = np.floor(exact).astype(int)
    quotas[np.argsort(-(exact - quotas), kind="stable")[: validation_size - quotas.sum()]] += 1
    validation = []
    for cls, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == cls)
        validation.append(rng.choice(members, size=quota, replace=False))
    validation = np.sort(np.concatenate(validation))
    train = np.setdiff1d(np.arange(len(labels)), validation, assume_unique=True)
    return train, validation


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images, on the 0..1 scale."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return pixels.mean(axis=0).tolist(), pixels.std(axis=0).tolist()


def content_hash(split: Split) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.images).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()


def data_card(splits: dict[str, Split]) -> dict:
    return {
        name: {
            "images": len(split),
            "per_class": {cls: int((split.labels == i).sum()) for i, cls in enumerate(CLASSES)},
            "sha256": content_hash(split),
        }
        for name, split in splits.items()
    }


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, content: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(content))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, content) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))


def write_csv(path: Path, rows: list[dict], missing: str = "") -> None:
    """Rows as a table, header first, written atomically. The columns are every row's keys, in the
    order of the row that has most; a cell a row lacks holds `missing`."""
    columns = dict.fromkeys(key for row in sorted(rows, key=len, reverse=True) for key in row)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), restval=missing, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(Path(path), lambda f: f.write(text.getvalue().encode()))


def save_split(path: Path, split: Split) -> None:
    _atomic_write(Path(path), lambda f: np.savez(f, images=split.images, labels=split.labels))


def load_split(source: Path | BinaryIO) -> Split:
    with np.load(source, allow_pickle=False) as archive:
        return Split(archive["images"], archive["labels"])


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def load(cls, prepared_dir: Path) -> Normalization:
        return cls.from_json((Path(prepared_dir) / STATS_FILE).read_bytes())

    @classmethod
    def from_json(cls, text: str | bytes) -> Normalization:
        stats = json.loads(text)
        return cls(tuple(stats["mean"]), tuple(stats["std"]))


# --------------------------------------------------------------------------------------------
# Batches on tensors


def load_prepared(prepared_dir: Path) -> tuple[tuple[Split, Split, Normalization], str]:
    """(train split, validation split, normalisation) as training uses them, and the SHA-256 of
    the files they came from (what names the data a model was trained on). Each file is read
    once: hashed and decoded from the same bytes. The test split is not read."""
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "train.npz").is_file():
        raise DataError(f"{prepared_dir} has no train.npz; run the preprocess stage first (dvc repro preprocess)")
    digest = hashlib.sha256()
    contents = {}
    for name in ("train.npz", "val.npz", STATS_FILE):
        contents[name] = (prepared_dir / name).read_bytes()
        digest.update(contents[name])
    data = (load_split(io.BytesIO(contents["train.npz"])), load_split(io.BytesIO(contents["val.npz"])),
            Normalization.from_json(contents[STATS_FILE]))
    return data, digest.hexdigest()


def to_tensor_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC array -> uint8 NCHW tensor, once per run rather than once per batch."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@functools.lru_cache(maxsize=32)
def _affine(norm: Normalization, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's (shift, scale), made once per device: on a GPU each new small tensor is a
    host-to-device copy, and training asks for them every step."""
    scale = torch.tensor([1 / (255 * s) for s in norm.std], dtype=dtype).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(norm.mean, norm.std)], dtype=dtype).view(1, -1, 1, 1)
    return shift.to(device), scale.to(device)


def normalize(images: torch.Tensor, norm: Normalization, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> float, standardised per channel: one fused multiply-add per pixel."""
    shift, scale = _affine(norm, dtype, images.device)
    return torch.addcmul(shift, images.to(dtype), scale)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's augmentation for a uint8 NCHW batch: zero-pad, random crop, random h-flip
    (or the h-flip of the images `flip`, a boolean per image, says).

    One gather for the whole batch instead of a Python loop over images; working on uint8
    moves a quarter of the bytes of float. The offsets are drawn where `generator` is: with
    the images on a GPU and a GPU generator, nothing crosses to the host.
    """
    n, _, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    flip = torch.rand(n, 1, generator=generator, device=device) < 0.5 if flip is None else flip.view(n, 1)
    rows = dy + torch.arange(height, device=device)  # (n, H)
    cols = dx + torch.arange(width, device=device)  # (n, W)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=device).view(n, 1, 1, 1)
    channel = torch.arange(images.shape[1], device=device).view(1, -1, 1, 1)
    return padded[batch, channel, rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]


def progressive_image_size(epoch: int, epochs: int, full_size: int, start_size: int = 0,
                           full_size_at: float = 0.75, step: int = 4) -> int:
    """The image side to train `epoch` (0-based) of `epochs` at, for progressive resizing
    (fast.ai's DAWNBench runs, FFCV): the ramp's first `round(full_size_at * epochs)` epochs
    step up from `start_size` by `step` px, each size below `full_size` for an equal share of
    them (floored), and every later epoch trains at `full_size`. Equal shares put no epoch at
    a size rounded up to full before the ramp ends, where the full-size epochs cost most: a
    16 px epoch of CIFAR trained 2.8x faster than a 32 px one on a 2-core CPU (BENCHMARKS.md).
    The last epochs, at full size, fit the network to the size it is tested at. `start_size`
    0 (or `full_size`): off."""
    if not start_size or start_size >= full_size:
        return full_size
    ramp_epochs = max(1, math.floor(full_size_at * epochs + 0.5))
    if epoch >= ramp_epochs:
        return full_size
    sizes_below_full = math.ceil((full_size - start_size) / step)
    return start_size + step * (sizes_below_full * epoch // ramp_epochs)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A float NCHW batch scaled to `size` x `size`, anti-aliased as torchvision's Resize is
    (detail finer than the new pixels is blurred away, not aliased); unchanged at its own size."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def alternating_flips(num_items: int, seed: int, epoch: int, device: torch.device = torch.device("cpu")
                      ) -> torch.Tensor:
    """Which of the images to mirror in `epoch` (airbench's alternating flip): a random half,
    fixed by `seed`, in even epochs, and the other half in odd ones, so that every image is
    seen both ways in every two epochs, where a fresh coin per epoch shows a quarter of them
    one way only."""
    generator = torch.Generator(device=device).manual_seed(seed * 7_919 + 17)
    return (torch.rand(num_items, generator=generator, device=device) < 0.5) ^ bool(epoch % 2)


def epoch_batches(
    num_items: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    device: torch.device = torch.device("cpu"),
) -> Iterator[torch.Tensor]:
    """This worker's index batches for one epoch: one shuffle shared by all workers, then
    every `world_size`-th index (DistributedSampler's scheme), fixed by (seed, epoch). The
    shuffle is drawn on `device` (a GPU's generator draws another order from the same seed
    than the CPU's), so the batches index a dataset there without a copy from the host."""
    generator = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator, device=device)
    mine = order[rank::world_size]
    per_worker = num_items // world_size  # equal counts on every worker, so DDP steps line up
    mine = mine[:per_worker]
    stop = len(mine) - len(mine) % batch_size if drop_last else len(mine)
    for start in range(0, stop, batch_size):
        yield mine[start : start + batch_size]
