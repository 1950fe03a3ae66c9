"""The trainer's data pipeline: Food-101 layout, image folders, synthetic data, splits, augmentation, download."""

from __future__ import annotations

import functools
import pickle
import socket
import tarfile
from collections import Counter
from pathlib import Path

import food101_fixture as fx
import pytest
import torch
from torch.utils.data import DataLoader

from mps_autobatch.train import data
from mps_autobatch.train.data import (
    DownloadError,
    ImageDataset,
    download_food101,
    load_dataset,
    make_eval_transform,
    make_train_transform,
)

NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
SIZE = 24


def _labels(dataset: torch.utils.data.Dataset) -> list[int]:
    return sorted(label for _, label in dataset.samples)


def _paths(dataset: ImageDataset) -> list[str]:
    return [path for path, _ in dataset.samples]


@pytest.fixture
def food(tmp_path: Path) -> Path:
    return fx.write_food101(tmp_path / "data")


# --- Food-101 ----------------------------------------------------------------------------------------------------


def test_food101_splits_are_stratified_and_follow_the_meta_files(food: Path) -> None:
    splits = load_dataset("food-101", food, image_size=SIZE, **NORM, val_fraction=0.4)

    assert splits.classes == list(fx.CLASSES)
    # apple_pie lists 6 training files (5 + the corrupt one): round(2.4) = 2 to val; the others round(2.0) = 2.
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 6, 6)
    assert _labels(splits.val) == [0, 0, 1, 1, 2, 2]
    assert _labels(splits.test) == [0, 0, 1, 1, 2, 2]
    listed = (food / "food-101" / "meta" / "train.txt").read_text().split()
    expected = sorted(str(food / "food-101" / "images" / f"{line}.jpg") for line in listed)
    assert sorted(_paths(splits.train) + _paths(splits.val)) == expected
    image, label = splits.test[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32 and isinstance(label, int)


def test_food101_accepts_the_dataset_folder_itself(food: Path) -> None:
    parent = load_dataset("food-101", food, image_size=SIZE, **NORM)
    itself = load_dataset("food-101", food / "food-101", image_size=SIZE, **NORM)
    assert itself.train.samples == parent.train.samples and itself.val.samples == parent.val.samples


def test_the_val_split_depends_on_the_seed_only(food: Path) -> None:
    first, again, other = (load_dataset("food-101", food, image_size=SIZE, **NORM, seed=s) for s in (0, 0, 1))
    assert _paths(first.val) == _paths(again.val)
    assert _paths(first.val) != _paths(other.val)


def test_a_corrupt_image_is_skipped_and_counted(food: Path) -> None:
    splits = load_dataset("food-101", food, image_size=SIZE, **NORM)
    assert splits.skipped == 0
    for split in (splits.train, splits.val, splits.test):
        for index in range(len(split)):
            split[index]
    corrupt = str(food / "food-101" / "images" / f"{fx.CORRUPT}.jpg")
    assert splits.skipped == 1
    assert splits.train.skipped_files + splits.val.skipped_files == [corrupt]


def test_an_unreadable_file_yields_the_next_readable_sample(tmp_path: Path) -> None:
    good_a, good_b = fx.write_jpeg(tmp_path / "a.jpg", seed=1), fx.write_jpeg(tmp_path / "b.jpg", seed=2)
    corrupt = tmp_path / "c.jpg"
    corrupt.write_bytes(b"garbage")
    dataset = ImageDataset([(str(good_a), 0), (str(corrupt), 1), (str(good_b), 2)], make_eval_transform(SIZE, **NORM))

    image, label = dataset[1]

    assert label == 2 and torch.equal(image, dataset[2][0])
    assert (dataset.skipped, dataset.skipped_files) == (1, [str(corrupt)])
    dataset[1]  # a known-bad file is not counted twice
    assert dataset.skipped == 1


def _missing_message(food: Path, missing: Path) -> str:
    return (
        f"Food-101 not found: '{missing}' is missing. "
        f"Download it with: autobatch train --dataset food-101 --data-dir {food} --download"
    )


@pytest.mark.parametrize(
    "removed",
    [
        # the metadata
        "food-101/meta/train.txt",
        "food-101/meta/classes.txt",
        "food-101/meta/test.txt",
        # the images: a whole class, or the whole dataset
        "food-101/images/bibimbap",
        "food-101",
    ],
)
def test_a_missing_part_is_named_with_the_command_that_fetches_it(food: Path, removed: str) -> None:
    target = food / removed
    if target.is_dir():
        for path in sorted(target.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        target.rmdir()
    else:
        target.unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_dataset("food-101", food, image_size=SIZE, **NORM)

    assert str(info.value) == _missing_message(food, target)


def test_missing_images_are_counted_in_the_message(food: Path) -> None:
    for i in (1, 3):
        (food / "food-101" / "images" / "bibimbap" / f"{i}.jpg").unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_dataset("food-101", food / "food-101", image_size=SIZE, **NORM)

    first = food / "food-101" / "images" / "bibimbap" / "1.jpg"
    assert str(info.value) == (
        f"Food-101 not found: '{first}' and 1 more images listed in meta/train.txt are missing. "
        f"Download it with: autobatch train --dataset food-101 --data-dir {food} --download"
    )


@pytest.mark.parametrize(
    ("spec", "data_dir", "message"),
    [
        ("food-101", None, "Food-101 needs a data directory. Pass --data-dir DIR (add --download to fetch it there)."),
        ("imagenet", None, "Unknown dataset 'imagenet'. Use 'food-101', 'imagefolder:PATH' or 'synthetic'."),
    ],
)
def test_bad_specs_are_value_errors(spec: str, data_dir: None, message: str) -> None:
    with pytest.raises(ValueError) as info:
        load_dataset(spec, data_dir, image_size=SIZE, **NORM)
    assert str(info.value) == message


# --- image folders -----------------------------------------------------------------------------------------------


def test_imagefolder_splits_exactly_and_by_seed(tmp_path: Path) -> None:
    root = fx.write_imagefolder(tmp_path / "pets", {"cat": 5, "dog": 7, "fox": 3})
    (root / "dog" / "notes.txt").write_text("not an image")

    def load(seed: int) -> data.DataSplits:
        return load_dataset(f"imagefolder:{root}", None, image_size=SIZE, **NORM, seed=seed, val_fraction=0.25)

    first, again, other = load(0), load(0), load(1)

    assert first.classes == ["cat", "dog", "fox"] and first.test is None
    # cat round(1.25) = 1, dog round(1.75) = 2, fox round(0.75) = 1
    assert (len(first.train), len(first.val)) == (11, 4)
    assert _labels(first.val) == [0, 1, 1, 2]
    assert _paths(first.val) == _paths(again.val) and _paths(first.train) == _paths(again.train)
    assert _paths(first.val) != _paths(other.val)


def test_imagefolder_errors_say_what_to_pass(tmp_path: Path) -> None:
    missing, empty = tmp_path / "nowhere", tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)

    with pytest.raises(FileNotFoundError) as not_there:
        load_dataset(f"imagefolder:{missing}", None, image_size=SIZE, **NORM)
    with pytest.raises(FileNotFoundError) as no_images:
        load_dataset(f"imagefolder:{empty}", None, image_size=SIZE, **NORM)

    assert str(not_there.value) == (
        f"Image folder '{missing}' not found. Pass --dataset imagefolder:DIR, where DIR has one sub-folder per class."
    )
    assert str(no_images.value) == (
        f"No images found in '{empty}'. Put each class's .jpg/.png files in its own sub-folder, "
        f"e.g. '{empty / 'cat' / '001.jpg'}'."
    )


# --- synthetic ---------------------------------------------------------------------------------------------------


def test_synthetic_has_the_stated_sizes_and_is_deterministic() -> None:
    def load() -> data.DataSplits:
        return load_dataset("synthetic", None, image_size=SIZE, **NORM, synthetic_sizes=(20, 8), synthetic_classes=4)

    first, again = load(), load()

    assert (len(first.train), len(first.val), first.test, len(first.classes)) == (20, 8, None, 4)
    assert Counter(label for _, label in first.train) == {0: 5, 1: 5, 2: 5, 3: 5}
    for index in (0, 7, 19):
        assert torch.equal(first.train[index][0], again.train[index][0])
    assert not torch.equal(first.train[0][0], first.val[0][0])
    assert first.train[0][0].shape == (3, SIZE, SIZE) and first.skipped == 0


def test_synthetic_defaults() -> None:
    splits = load_dataset("synthetic", None, image_size=SIZE, **NORM)
    assert (len(splits.train), len(splits.val), len(splits.classes)) == (512, 128, 10)


# --- dev subsets -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dev_samples", [1, 2, 4, 7, 9])
def test_dev_samples_is_a_stratified_subset_of_train(tmp_path: Path, dev_samples: int) -> None:
    root = fx.write_imagefolder(tmp_path / "uneven", {"a": 9, "b": 6, "c": 4})  # train: 8, 5, 3 after val
    full = load_dataset(f"imagefolder:{root}", None, image_size=SIZE, **NORM)
    dev = load_dataset(f"imagefolder:{root}", None, image_size=SIZE, **NORM, dev_samples=dev_samples)

    counts = Counter(label for _, label in dev.train.samples)
    assert len(dev.train) == dev_samples
    assert max(counts.values()) - min(counts.get(c, 0) for c in range(3)) <= 1
    assert set(_paths(dev.train)) <= set(_paths(full.train))
    assert _paths(dev.val) == _paths(full.val)


def test_dev_samples_beyond_the_train_split_keeps_it_all(tmp_path: Path) -> None:
    root = fx.write_imagefolder(tmp_path / "small", {"a": 3, "b": 3})
    full = load_dataset(f"imagefolder:{root}", None, image_size=SIZE, **NORM)
    dev = load_dataset(f"imagefolder:{root}", None, image_size=SIZE, **NORM, dev_samples=500)
    assert _paths(dev.train) == _paths(full.train)


# --- augmentation ------------------------------------------------------------------------------------------------


def _same_picture(tmp_path: Path, count: int) -> ImageDataset:
    picture = str(fx.write_jpeg(tmp_path / "same.jpg", seed=7))
    return ImageDataset([(picture, 0)] * count, make_train_transform(SIZE, **NORM), seed=3)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    dataset, twin = _same_picture(tmp_path, 4), _same_picture(tmp_path, 4)
    first = dataset[2][0]
    dataset[1], dataset[3]  # other draws in between change nothing

    assert torch.equal(dataset[2][0], first) and torch.equal(twin[2][0], first)
    assert not torch.equal(dataset[1][0], first)  # same picture, other index
    dataset.set_epoch(1)
    assert not torch.equal(dataset[2][0], first)
    dataset.set_epoch(0)
    assert torch.equal(dataset[2][0], first)


class _UnseededDataset(torch.utils.data.Dataset):
    """The usual pattern: one Compose, its own random state, copied into every worker (the 2.0.8 bug)."""

    def __init__(self, picture: str, count: int) -> None:
        self.picture, self.count, self.transform = picture, count, make_train_transform(SIZE, **NORM)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=data.read_image(self.picture))["image"], 0


def _first_sample_per_worker(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    # Without shuffling, worker 0 loads index 0 first and worker 1 loads index 1 first.
    loader = DataLoader(dataset, batch_size=1, num_workers=2, multiprocessing_context="fork")
    batches = iter(loader)
    return next(batches)[0], next(batches)[0]


@pytest.mark.timeout(120)
def test_two_workers_draw_different_augmentations(tmp_path: Path) -> None:
    dataset = _same_picture(tmp_path, 4)
    worker0, worker1 = _first_sample_per_worker(dataset)

    assert not torch.equal(worker0, worker1)
    assert torch.equal(worker0[0], dataset[0][0]) and torch.equal(worker1[0], dataset[1][0])
    # The control: the same pipeline without per-sample seeds repeats itself across workers.
    bug0, bug1 = _first_sample_per_worker(_UnseededDataset(dataset.samples[0][0], 4))
    assert torch.equal(bug0, bug1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])  # Linux's default, macOS's default
def test_skips_in_workers_reach_the_main_process(food: Path, start_method: str) -> None:
    splits = load_dataset("food-101", food, image_size=SIZE, **NORM, val_fraction=0)
    loader = DataLoader(splits.train, batch_size=4, num_workers=2, multiprocessing_context=start_method)

    labels = [label for _, batch in loader for label in batch.tolist()]

    assert len(labels) == len(splits.train) == 16
    assert splits.skipped == 1


def test_datasets_survive_pickling(food: Path) -> None:
    splits = load_dataset("food-101", food, image_size=SIZE, **NORM, val_fraction=0)
    corrupt = _paths(splits.train).index(str(food / "food-101" / "images" / f"{fx.CORRUPT}.jpg"))
    splits.train[corrupt]

    copy = pickle.loads(pickle.dumps(splits.train))

    assert copy.skipped == 1 and torch.equal(copy[5][0], splits.train[5][0])


# --- download ----------------------------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> bytes:
    return fx.make_archive(fx.write_food101(tmp_path / "source"))


@pytest.fixture
def server(archive: bytes):
    with fx.serve(archive) as running:
        yield running


def _download(server: fx.ArchiveServer, data_dir: Path, **overrides: object) -> Path:
    options = {"url": server.url, "md5": fx.md5_of(server.payload), "size": len(server.payload), "progress": False}
    return download_food101(data_dir, **{**options, **overrides})


@pytest.mark.timeout(120)
def test_download_checks_and_extracts(tmp_path: Path, server: fx.ArchiveServer) -> None:
    folder = _download(server, tmp_path / "data")

    assert folder == tmp_path / "data" / "food-101"
    assert (folder / "meta" / "classes.txt").read_text().split() == list(fx.CLASSES)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["food-101"]  # no archive left behind
    assert server.ranges == [None]


@pytest.mark.timeout(120)
def test_a_partial_download_is_resumed_with_a_range_request(tmp_path: Path, server: fx.ArchiveServer) -> None:
    half = len(server.payload) // 2
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "food-101.tar.gz.part").write_bytes(server.payload[:half])

    folder = _download(server, tmp_path / "data")

    assert server.ranges == [f"bytes={half}-"]
    assert (folder / "meta" / "train.txt").exists()


@pytest.mark.timeout(120)
def test_a_cut_off_transfer_is_kept_and_resumed(tmp_path: Path, server: fx.ArchiveServer) -> None:
    cut = len(server.payload) // 3
    server.cut_at = cut
    part = tmp_path / "data" / "food-101.tar.gz.part"

    with pytest.raises(DownloadError) as info:
        _download(server, tmp_path / "data")
    size = len(server.payload)
    assert (
        str(info.value)
        == f"Download of {server.url} stopped at {cut:,} of {size:,} bytes. Run the command again to resume."
    )
    assert part.read_bytes() == server.payload[:cut]
    folder = _download(server, tmp_path / "data")

    assert server.ranges == [None, f"bytes={cut}-"]
    assert folder.is_dir() and not part.exists()


@pytest.mark.timeout(120)
def test_a_server_that_ignores_range_restarts_the_file(tmp_path: Path, server: fx.ArchiveServer) -> None:
    server.honour_range = False
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "food-101.tar.gz.part").write_bytes(b"stale bytes")

    assert _download(server, tmp_path / "data").is_dir()
    assert server.ranges == ["bytes=11-"]


@pytest.mark.timeout(120)
def test_a_wrong_md5_is_rejected_and_the_file_removed(tmp_path: Path, server: fx.ArchiveServer) -> None:
    part = tmp_path / "data" / "food-101.tar.gz.part"

    with pytest.raises(DownloadError) as info:
        _download(server, tmp_path / "data", md5="0" * 32)

    assert str(info.value) == (
        f"Checksum mismatch for '{part}': md5 {fx.md5_of(server.payload)}, expected {'0' * 32}. "
        "The corrupt download was removed; run the command again."
    )
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.timeout(120)
def test_a_wrong_size_is_rejected_before_downloading(tmp_path: Path, server: fx.ArchiveServer) -> None:
    size = len(server.payload)
    with pytest.raises(DownloadError) as info:
        _download(server, tmp_path / "data", size=size + 1)
    assert str(info.value) == (
        f"{server.url} serves {size:,} bytes, expected {size + 1:,}. Check the URL and the expected size."
    )
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.timeout(120)
def test_an_unreachable_server_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/food-101.tar.gz"

    with pytest.raises(DownloadError) as info:
        download_food101(tmp_path / "data", url=url, progress=False)

    message = str(info.value)
    assert message.startswith(f"Cannot reach {url}: ") and "Connection refused" in message
    assert message.endswith(
        f". Download it elsewhere and extract it into {tmp_path / 'data'}, or check your connection."
    )


@pytest.mark.timeout(120)
def test_an_archive_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evil.txt").write_text("outside")
    buffer_path = tmp_path / "evil.tar.gz"
    with tarfile.open(buffer_path, "w:gz") as tar:
        tar.add(tmp_path / "evil.txt", arcname="../evil.txt")
    with fx.serve(buffer_path.read_bytes()) as evil, pytest.raises(DownloadError, match="holds an unsafe entry"):
        _download(evil, tmp_path / "data" / "inner")
    assert not (tmp_path / "data" / "evil.txt").exists()


@pytest.mark.timeout(120)
def test_load_dataset_downloads_when_asked(
    tmp_path: Path, server: fx.ArchiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"url": server.url, "md5": fx.md5_of(server.payload), "size": len(server.payload)}
    monkeypatch.setattr(data, "download_food101", functools.partial(download_food101, **options))

    splits = load_dataset("food-101", tmp_path / "data", image_size=SIZE, **NORM, download=True)

    assert (len(splits.train) + len(splits.val), len(splits.test)) == (16, 6)
    assert server.ranges == [None]
