"""DVC stage `preprocess`: compact arrays, a stratified train/validation split, channel stats.

The prepared folder is written whole into a staging folder beside it and swapped in only when
complete, so a run killed at any moment leaves the previous folder (or none), never a mix; the
next run removes the stale staging folder and starts again. The swap deletes the previous
folder, so a folder holding anything this stage does not write is refused before any work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.common import run_stage
from pipeline.config import Params
from pipeline.fetch import checksums_for
from resattn import cifar10
from resattn.data import SPLITS, STATS_FILE, channel_stats, data_card, save_split, stratified_split, write_json

DATA_CARD = Path("reports/data_card.json")
PREPARED_FILES = frozenset({*(f"{name}.npz" for name in SPLITS), STATS_FILE})


def check_replaceable(prepared: Path) -> None:
    """Refuse a `data.prepared_dir` that is not a previous output of this stage (one holding
    nothing but the files it writes, or empty): the swap would delete what else it holds."""
    if prepared.exists() and not prepared.is_dir():
        raise cifar10.DataError(f"data.prepared_dir {prepared} is a file; point it at a folder")
    foreign = sorted(p.name for p in prepared.iterdir() if p.name not in PREPARED_FILES) if prepared.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise cifar10.DataError(
            f"data.prepared_dir {prepared} holds {shown}, which this stage did not write; preprocessing replaces "
            f"the whole folder and would delete them: point data.prepared_dir at a new or empty folder")


def replace_directory(complete: Path, target: Path) -> None:
    """Put `complete` at `target`. Between the two renames `target` is briefly absent (which
    reads as "not prepared"), never partly written."""
    if target.exists():
        retired = target.with_name(f".{target.name}-staging-retired")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(complete, target)
        shutil.rmtree(retired)
    else:
        os.replace(complete, target)


def preprocess(params: Params) -> None:
    prepared = Path(params.data.prepared_dir)
    check_replaceable(prepared)
    raw = Path(params.data.raw_dir) / cifar10.FOLDER_NAME
    if not raw.is_dir():
        raise cifar10.DataError(f"{raw} does not exist; run the fetch stage first (dvc repro fetch)")
    train_full, test = cifar10.load(raw, checksums_for(params))
    if params.data.validation_size >= len(train_full):
        raise cifar10.DataError(
            f"data.validation_size {params.data.validation_size} must be below the "
            f"{len(train_full)} training images"
        )
    train_index, val_index = stratified_split(train_full.labels, params.data.validation_size, params.data.split_seed)
    splits = {
        "train": cifar10.Split(train_full.images[train_index], train_full.labels[train_index]),
        "val": cifar10.Split(train_full.images[val_index], train_full.labels[val_index]),
        "test": test,
    }
    prepared.parent.mkdir(parents=True, exist_ok=True)
    for stale in prepared.parent.glob(f".{prepared.name}-staging-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    staging = Path(tempfile.mkdtemp(prefix=f".{prepared.name}-staging-", dir=prepared.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would make the prepared data private
    try:
        for name, split in splits.items():
            save_split(staging / f"{name}.npz", split)
        mean, std = channel_stats(splits["train"].images)
        write_json(staging / STATS_FILE, {"mean": mean, "std": std, "computed_on": "train"})
        replace_directory(staging, prepared)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    card = data_card(splits)
    write_json(DATA_CARD, card)
    print(", ".join(f"{name}: {entry['images']:,} images" for name, entry in card.items()))


if __name__ == "__main__":
    run_stage(__doc__, preprocess)
