"""Fetching, verification, safe decoding, splitting and augmentation of CIFAR-10."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REAL_CIFAR10, synthetic_split
from pipeline.config import parse_params
from pipeline.fetch import fetch as fetch_stage
from pipeline.preprocess import preprocess
from resattn import cifar10
from resattn.cifar10 import DataError, fetch, load, read_md5_list
from resattn.data import (
    Normalization,
    alternating_flips,
    epoch_batches,
    load_prepared,
    load_split,
    normalize,
    progressive_image_size,
    random_crop_flip,
    resize_images,
    save_split,
    stratified_split,
    write_csv,
    write_json,
)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_fetch_from_a_folder_verifies_and_decodes(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    destination = fetch(str(folder), tmp_path / "raw" / "cifar-10-batches-py", read_md5_list(md5_list))
    train, test = load(destination, read_md5_list(md5_list))
    assert train.images.shape == (400, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.labels.shape == (100,)
    assert leftovers(tmp_path / "raw") == ["cifar-10-batches-py"]


def test_fetch_from_a_tarball(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    destination = fetch(str(tarball), tmp_path / "raw" / "x", read_md5_list(md5_list))
    assert sorted(os.listdir(destination)) == sorted(cifar10.OFFICIAL_MD5)


def test_checksum_mismatch_names_file_and_hashes_and_leaves_nothing(small_cifar, tmp_path):
    folder, _ = small_cifar
    # The official list does not match the synthetic files.
    with pytest.raises(DataError) as error:
        fetch(str(folder), tmp_path / "raw" / "cifar-10-batches-py")
    message = str(error.value)
    assert f"checksum mismatch for {folder}/data_batch_1: expected md5 c99cafc152244af753f735de768cd75f, got" in message
    assert leftovers(tmp_path / "raw") == []


def test_truncated_file_is_refused_before_unpickling(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    copy = tmp_path / "copy"
    fetch(str(folder), copy, read_md5_list(md5_list))
    data = (copy / "data_batch_3").read_bytes()
    (copy / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"checksum mismatch for .*data_batch_3"):
        load(copy, read_md5_list(md5_list))
    with pytest.raises(DataError, match="data_batch_3"):
        fetch(str(copy), tmp_path / "raw" / "again", read_md5_list(md5_list))
    assert leftovers(tmp_path / "raw") == []


def test_unreachable_source_names_the_override(tmp_path):
    with pytest.raises(DataError) as error:
        fetch("http://127.0.0.1:9/cifar-10-python.tar.gz", tmp_path / "raw" / "c")
    assert "RESATTN_CIFAR10_SOURCE" in str(error.value)
    assert leftovers(tmp_path / "raw") == []
    with pytest.raises(DataError, match="neither a URL"):
        fetch(str(tmp_path / "nowhere"), tmp_path / "raw" / "c")


def test_a_pickle_that_runs_code_is_never_run(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    evil = tmp_path / "evil"
    fetch(str(folder), evil, read_md5_list(md5_list))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (evil / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit()}, protocol=3))
    checksums = read_md5_list(md5_list) | {"data_batch_1": cifar10.md5_of(evil / "data_batch_1")}
    with pytest.raises(DataError, match="is not allowed in a CIFAR-10 file"):
        load(evil, checksums)
    assert not marker.exists()


def test_wrong_shapes_and_labels_are_refused(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    bad = tmp_path / "bad"
    fetch(str(folder), bad, read_md5_list(md5_list))
    content = {b"data": np.zeros((4, 100), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (bad / "data_batch_2").write_bytes(pickle.dumps(content, protocol=3))
    checksums = read_md5_list(md5_list) | {"data_batch_2": cifar10.md5_of(bad / "data_batch_2")}
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        load(bad, checksums)
    content = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 12]}
    (bad / "data_batch_2").write_bytes(pickle.dumps(content, protocol=3))
    checksums["data_batch_2"] = cifar10.md5_of(bad / "data_batch_2")
    with pytest.raises(DataError, match=r"labels must lie in 0..9"):
        load(bad, checksums)


def test_a_zero_stride_array_in_a_pickle_is_refused_before_it_can_grow(small_cifar, tmp_path):
    """162 bytes that numpy.ndarray(shape, dtype, buffer, offset, strides) would turn into a
    10-million-image view of one byte, and the first copy into 30 GB."""
    folder, md5_list = small_cifar
    bad = tmp_path / "bad"
    fetch(str(folder), bad, read_md5_list(md5_list))

    class ZeroStrides:
        def __reduce__(self):
            return (np.ndarray, ((10**7, 3072), np.dtype("u1"), b"\0", 0, (0, 0)))

    (bad / "data_batch_2").write_bytes(pickle.dumps({b"data": ZeroStrides(), b"labels": [0] * 10}, protocol=3))
    checksums = read_md5_list(md5_list) | {"data_batch_2": cifar10.md5_of(bad / "data_batch_2")}
    with pytest.raises(DataError, match=r"data_batch_2 is not a valid CIFAR-10 pickle: numpy.ndarray\(...\) called"):
        load(bad, checksums)
    (bad / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072)), b"labels": [0, 1]}, protocol=3))
    checksums["data_batch_2"] = cifar10.md5_of(bad / "data_batch_2")
    with pytest.raises(DataError, match=r"data_batch_2 is not a valid CIFAR-10 pickle: dtype 'f8' is not one of"):
        load(bad, checksums)


def test_a_source_with_files_larger_than_cifar_is_refused_before_copying(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    huge = 20 * 2**30  # sparse: costs nothing on disk, and as a tar member compresses to almost nothing
    big = tmp_path / "big" / "cifar-10-batches-py"
    big.mkdir(parents=True)
    for name in cifar10.OFFICIAL_MD5:
        (big / name).write_bytes((folder / name).read_bytes())
    with open(big / "data_batch_4", "r+b") as grown:
        grown.truncate(huge)
    expected = f"data_batch_4 is {huge:,} bytes, but CIFAR-10's is at most {32 * 2**20:,}; this is not CIFAR-10"
    with pytest.raises(DataError, match=expected):
        fetch(str(big), tmp_path / "raw" / "a", read_md5_list(md5_list))
    tarball = tmp_path / "big.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in cifar10.OFFICIAL_MD5:
            if name != "data_batch_4":
                tar.add(folder / name, arcname=f"cifar-10-batches-py/{name}")
        member = tarfile.TarInfo("cifar-10-batches-py/data_batch_4")
        member.size = 40 * 2**20  # 40 MB of zeros: 40 kB in the tarball
        tar.addfile(member, io.BytesIO(bytes(member.size)))
    with pytest.raises(DataError, match=f"data_batch_4 is {40 * 2**20:,} bytes, but CIFAR-10's is at most"):
        fetch(str(tarball), tmp_path / "raw" / "b", read_md5_list(md5_list))
    assert leftovers(tmp_path / "raw") == []  # nothing copied, no staging left


@pytest.mark.skipif(not REAL_CIFAR10.is_dir(), reason="real CIFAR-10 not present beside the project")
def test_real_cifar10_through_the_fetch_and_preprocess_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RESATTN_CIFAR10_SOURCE", str(REAL_CIFAR10))
    params = parse_params({"data": {"source": "https://unreachable.invalid/cifar.tar.gz"}})
    fetch_stage(params)
    preprocess(params)
    train, val, test = (load_split(tmp_path / "data/prepared" / f"{name}.npz") for name in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (45_000, 5_000, 10_000)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert np.bincount(val.labels).tolist() == [500] * 10
    assert test.labels[0] == cifar10.CLASSES.index("cat")
    card = json.loads((tmp_path / "reports/data_card.json").read_text())
    assert card["test"]["per_class"]["cat"] == 1000
    # No image appears in both sets (CIFAR10.md); hashes of rows make that cheap to check.
    seen = {row.tobytes() for row in train.images.reshape(len(train), -1)}
    assert not any(row.tobytes() in seen for row in test.images.reshape(len(test), -1))


def test_training_reads_prepared_data_once_and_names_runs_by_its_bytes(tmp_path, monkeypatch):
    prepared = tmp_path / "prepared"
    splits = {"train": synthetic_split(40, 0), "val": synthetic_split(10, 1)}
    for name, split in splits.items():
        save_split(prepared / f"{name}.npz", split)
    write_json(prepared / "stats.json", {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]})
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or read_bytes(self))

    (train, val, norm), digest = load_prepared(prepared)

    assert sorted(reads) == ["stats.json", "train.npz", "val.npz"]
    np.testing.assert_array_equal(train.images, splits["train"].images)
    np.testing.assert_array_equal(val.labels, splits["val"].labels)
    assert norm == Normalization((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    # Runs are named after this digest, so it must stay what earlier runs were named after.
    expected = hashlib.sha256(b"".join(read_bytes(prepared / n) for n in ("train.npz", "val.npz", "stats.json")))
    assert digest == expected.hexdigest()


def test_preprocess_refuses_a_prepared_dir_that_it_did_not_write_before_any_work(tmp_path, monkeypatch):
    """The swap deletes the previous folder: never one holding anything else."""
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    params = parse_params({"data": {"prepared_dir": str(home), "raw_dir": str(tmp_path / "nothing-fetched")}})
    with pytest.raises(DataError) as error:
        preprocess(params)
    assert str(error.value) == (f"data.prepared_dir {home} holds thesis.tex, which this stage did not write; "
                                f"preprocessing replaces the whole folder and would delete them: point "
                                f"data.prepared_dir at a new or empty folder")
    assert (home / "thesis.tex").read_text() == "years of work"
    previous = tmp_path / "previous"  # a previous output, or an empty folder, may be replaced
    previous.mkdir()
    (previous / "train.npz").write_bytes(b"old")
    for folder in (previous, tmp_path / "empty"):
        folder.mkdir(exist_ok=True)
        params = parse_params({"data": {"prepared_dir": str(folder), "raw_dir": str(tmp_path / "nothing-fetched")}})
        with pytest.raises(DataError, match="does not exist; run the fetch stage first"):  # past the check
            preprocess(params)


def test_stratified_split_is_deterministic_disjoint_and_proportional():
    labels = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 30, 30, 30, 30, 13])
    train, val = stratified_split(labels, 50, seed=3)
    again, _ = stratified_split(labels, 50, seed=3)
    other, _ = stratified_split(labels, 50, seed=4)
    assert len(val) == 50 and len(train) + len(val) == len(labels)
    assert not set(train) & set(val)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert max(abs(np.bincount(labels[val], minlength=10) - np.bincount(labels, minlength=10) * 50 / len(labels))) < 1


def test_random_crop_flip_takes_a_32x32_window_of_the_padded_image():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for original, crop in zip(padded, out):
        windows = [original[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        plain = any(torch.equal(crop, w) for w in windows)
        mirrored = any(torch.equal(crop, w.flip(-1)) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 15 < flips < 49  # about half are mirrored
    again = random_crop_flip(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    flips = [alternating_flips(1000, seed=3, epoch=epoch) for epoch in range(4)]
    assert 400 < int(flips[0].sum()) < 600
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0]) and torch.equal(flips[3], flips[1])
    assert not torch.equal(alternating_flips(1000, seed=4, epoch=0), flips[0])
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    chosen = torch.tensor([True, False] * 4)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0, flip=chosen)
    assert torch.equal(out[chosen], images[chosen].flip(-1)) and torch.equal(out[~chosen], images[~chosen])


def test_progressive_resizing_ramps_the_image_side_up_to_full_size_and_stays_there():
    sizes = [progressive_image_size(epoch, 11, 32, start_size=16, full_size_at=0.75) for epoch in range(11)]
    assert sizes == [16, 16, 20, 20, 24, 24, 28, 28, 32, 32, 32]
    assert [progressive_image_size(epoch, 4, 32) for epoch in range(4)] == [32] * 4  # off by default
    assert [progressive_image_size(epoch, 4, 32, start_size=32) for epoch in range(4)] == [32] * 4
    # The ramp's round(0.83 * 13) = 11 epochs share the five sizes below 32 as equally as whole
    # epochs allow, and none of them rounds up to full size before the ramp ends.
    sizes = [progressive_image_size(epoch, 13, 32, start_size=12, full_size_at=0.83) for epoch in range(13)]
    assert sizes == [12, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28, 32, 32]
    # One epoch more: round(0.83 * 14) = 12 ramp epochs, and the extra one goes to the middle size.
    sizes = [progressive_image_size(epoch, 14, 32, start_size=12, full_size_at=0.83) for epoch in range(14)]
    assert sizes == [12, 12, 12, 16, 16, 20, 20, 20, 24, 24, 28, 28, 32, 32]
    # A start off the step's grid climbs in whole steps and never past full size.
    assert [progressive_image_size(epoch, 5, 32, start_size=18, full_size_at=1.0) for epoch in range(5)] == [
        18, 18, 22, 26, 30]


def test_resizing_a_batch_filters_out_detail_finer_than_its_pixels_and_leaves_full_size_untouched():
    checkerboard = (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)) % 2
    batch = checkerboard.float().expand(2, 3, 32, 32)
    assert resize_images(batch, 32) is batch
    half = resize_images(batch, 16)
    assert half.shape == (2, 3, 16, 16)
    # Anti-aliased: a pattern finer than the new pixels becomes its mean grey; sampling would
    # have kept one of its colours, as black and white as before.
    assert torch.allclose(half, torch.full_like(half, 0.5), atol=0.02)


def test_a_table_whose_rows_lack_some_cells_keeps_every_column_and_fills_those_cells_as_asked(tmp_path):
    # A history validated every other epoch: its first row has no validation figures.
    rows = [{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.5, "val_accuracy": 0.4, "minutes": 3.0}]
    write_csv(tmp_path / "history.csv", rows)
    assert (tmp_path / "history.csv").read_text() == ("epoch,train_loss,val_accuracy,minutes\n"
                                                      "1,2.0,,\n"
                                                      "2,1.5,0.4,3.0\n")
    write_csv(tmp_path / "history.csv", rows, missing="nan")
    assert (tmp_path / "history.csv").read_text().splitlines()[1] == "1,2.0,nan,nan"


def test_normalize_standardises_each_channel():
    images = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
    norm = Normalization((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    out = normalize(images, norm)
    expected = torch.tensor([(128 / 255 - 0.5) / 0.5, (128 / 255 - 0.25) / 0.25, 128 / 255])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_epoch_batches_shard_one_shuffle_across_workers():
    shards = [list(torch.cat(list(epoch_batches(103, 10, seed=1, epoch=2, rank=r, world_size=2)))) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50  # equal step counts on every worker
    assert not set(map(int, shards[0])) & set(map(int, shards[1]))
    again = list(torch.cat(list(epoch_batches(103, 10, seed=1, epoch=2, rank=0, world_size=2))))
    next_epoch = list(torch.cat(list(epoch_batches(103, 10, seed=1, epoch=3, rank=0, world_size=2))))
    assert again == shards[0] and next_epoch != shards[0]


def test_fetch_from_s3_folder_and_tarball(small_cifar, tmp_path, s3_server):
    import boto3

    folder, md5_list = small_cifar
    checksums = read_md5_list(md5_list)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="datasets")
    for name in cifar10.OFFICIAL_MD5:
        s3.upload_file(str(folder / name), "datasets", f"cifar/{name}")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    s3.upload_file(str(tarball), "datasets", "cifar-10-python.tar.gz")

    from_prefix = fetch("s3://datasets/cifar", tmp_path / "raw" / "a", checksums)
    from_tarball = fetch("s3://datasets/cifar-10-python.tar.gz", tmp_path / "raw" / "b", checksums)
    for name in cifar10.OFFICIAL_MD5:
        assert (from_prefix / name).read_bytes() == (folder / name).read_bytes()
        assert (from_tarball / name).read_bytes() == (folder / name).read_bytes()

    with pytest.raises(DataError, match=r"could not read s3://datasets/nothing-here/data_batch_1"):
        fetch("s3://datasets/nothing-here", tmp_path / "raw" / "c", checksums)
    assert leftovers(tmp_path / "raw") == ["a", "b"]


def test_a_file_that_is_not_a_pickle_and_a_missing_file_are_named(small_cifar, tmp_path):
    folder, md5_list = small_cifar
    copy = tmp_path / "copy"
    fetch(str(folder), copy, read_md5_list(md5_list))
    (copy / "data_batch_4").write_bytes(b"%PDF-1.7 certainly not a pickle")
    checksums = read_md5_list(md5_list) | {"data_batch_4": cifar10.md5_of(copy / "data_batch_4")}
    with pytest.raises(DataError, match="data_batch_4"):
        load(copy, checksums)
    (copy / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load(copy, checksums)
    with pytest.raises(DataError, match="data_batch_4"):
        fetch(str(copy), tmp_path / "raw" / "again", checksums)
    assert leftovers(tmp_path / "raw") == []


def test_images_for_predict_are_refused_or_converted_clearly(tmp_path):
    from PIL import Image

    from resattn.inference import load_images

    Image.new("L", (64, 48), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (32, 32)).save(tmp_path / "alpha.png")
    assert load_images([tmp_path / "grey.png", tmp_path / "alpha.png"]).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"missing\.png: no such file"):
        load_images([tmp_path / "missing.png"])
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.png: not a readable image"):
        load_images([tmp_path / "text.png"])
    # A few kB on disk that would decode to 400 million pixels: refused before decoding.
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(ValueError, match=r"bomb\.png: not a readable image .*exceeds limit"):
        load_images([tmp_path / "bomb.png"])
