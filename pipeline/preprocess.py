"""DVC stage `preprocess`: compact arrays, a stratified train/validation split, channel stats."""

from __future__ import annotations

from pathlib import Path

from pipeline.common import run_stage
from pipeline.config import Params
from pipeline.fetch import checksums_for
from resattn import cifar10
from resattn.data import STATS_FILE, channel_stats, data_card, save_split, stratified_split, write_json

DATA_CARD = Path("reports/data_card.json")


def preprocess(params: Params) -> None:
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
    prepared = Path(params.data.prepared_dir)
    for name, split in splits.items():
        save_split(prepared / f"{name}.npz", split)
    mean, std = channel_stats(splits["train"].images)
    write_json(prepared / STATS_FILE, {"mean": mean, "std": std, "computed_on": "train"})
    card = data_card(splits)
    write_json(DATA_CARD, card)
    print(", ".join(f"{name}: {entry['images']:,} images" for name, entry in card.items()))


if __name__ == "__main__":
    run_stage(__doc__, preprocess)
