"""The trainer's data: Food-101 (downloaded when asked), class-per-folder or synthetic images; splits, loaders.

Every sample's augmentation is drawn from generators seeded with (seed, epoch, sample index), so a sample gets the
same crop whichever DataLoader worker or rank loads it; that also cures albumentations 2.0.8 giving every worker
the same random stream (REFERENCE.md F). Corrupt images are found lazily: a dataset that cannot decode a file marks
it in a flag array in shared memory (so marks made in worker processes reach the main process), returns the next
readable sample instead, and counts the file in ``skipped``. Checking every file up front with ``Image.verify()``
would cost minutes on Food-101's 101,000 images at every start.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import shlex
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import AutobatchError
from .config import TrainConfig

__all__ = [
    "DataSplits",
    "DownloadError",
    "EpochBatches",
    "FOOD101_MD5",
    "FOOD101_SIZE",
    "FOOD101_URL",
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "SyntheticDataset",
    "download_food101",
    "eval_loader",
    "load_dataset",
    "load_splits",
    "make_eval_transform",
    "make_train_transform",
    "read_image",
    "train_batches",
    "train_loader",
]

_Samples = list[tuple[str, int]]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case) an ``imagefolder:`` dataset reads."""

# What PIL raises for a file it cannot decode: unidentified or truncated (OSError), broken chunks (SyntaxError,
# struct.error, ValueError), absurd dimensions (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError)


def make_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """The training augmentation: random resized crop, horizontal flip, normalisation, CHW float tensor.

    Example:
        >>> t = make_train_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> t(image=np.zeros((40, 30, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    return A.Compose(
        [
            A.RandomResizedCrop(size=(image_size, image_size)),
            A.HorizontalFlip(),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ]
    )


def make_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875
) -> A.Compose:
    """The evaluation pipeline, timm's: shortest side to ``int(image_size / crop_pct)``, then a center crop.

    Example:
        >>> t = make_eval_transform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> t(image=np.zeros((40, 30, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=int(image_size / crop_pct)),
            A.CenterCrop(image_size, image_size),
            A.Normalize(mean=tuple(mean), std=tuple(std)),
            ToTensorV2(),
        ]
    )


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file into an RGB ``uint8`` array (H x W x 3).

    Raises:
        OSError: the file is missing or not a readable image (PIL's errors for broken files pass through too).
    """
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class _AugmentedDataset(torch.utils.data.Dataset):
    """Applies ``transform`` with generators seeded from (seed, epoch, index); ``set_epoch`` moves to new draws."""

    def __init__(self, transform: A.Compose, *, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s augmentations from now on (call it in every process before each epoch)."""
        self.epoch = epoch

    @property
    def skipped(self) -> int:
        """Unreadable files met so far, in any process."""
        return 0

    def _augment(self, image: np.ndarray, index: int) -> torch.Tensor:
        # One shared stream for the whole pipeline (set_random_seed would give each transform its own,
        # identically seeded generator, correlating e.g. the flip with the crop).
        numpy_state, python_state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
        self.transform.set_random_state(np.random.default_rng(numpy_state), random.Random(int(python_state)))
        return self.transform(image=image)["image"]


class ImageDataset(_AugmentedDataset):
    """Labelled image files; an unreadable one is replaced by the next readable sample and counted.

    The replacement is deterministic: index ``i`` always yields the first readable file at ``i, i + 1, ...``
    (wrapping around), augmented with index ``i``'s seed. Unreadable files are marked in a shared-memory tensor,
    so a DataLoader worker's discovery is seen by the main process (``skipped``) and by every other worker.

    Args:
        samples: ``(path, label)`` pairs.
        transform: an albumentations pipeline ending in ``ToTensorV2``.
        seed: the augmentation seed.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: A.Compose, *, seed: int = 0) -> None:
        super().__init__(transform, seed=seed)
        self.samples = [(str(path), int(label)) for path, label in samples]
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Received through a plain pickle (a copy, not a worker hand-off): share the copy with future workers.
        self._unreadable.share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._read_readable(index)
        return self._augment(image, index), label

    @property
    def skipped(self) -> int:
        """Unreadable files met so far, in any process."""
        return int(self._unreadable.sum())

    @property
    def skipped_files(self) -> list[str]:
        """The paths of the unreadable files met so far."""
        return [self.samples[i][0] for i in self._unreadable.nonzero().flatten().tolist()]

    def _read_readable(self, index: int) -> tuple[np.ndarray, int]:
        count = len(self.samples)
        for offset in range(count):
            candidate = (index + offset) % count
            if self._unreadable[candidate]:
                continue
            path, label = self.samples[candidate]
            try:
                return read_image(path), label
            except _DECODE_ERRORS:
                self._unreadable[candidate] = 1
        raise AutobatchError(
            f"None of the {count} images is readable (first: {self.samples[0][0]!r}). Check the dataset files."
        )


class SyntheticDataset(_AugmentedDataset):
    """Random images with a faint class-specific tint, generated from (seed, stream, index): deterministic.

    Args:
        size: number of samples.
        num_classes: labels are ``index % num_classes``, so classes are balanced.
        side: the generated images' height and width.
        transform: an albumentations pipeline ending in ``ToTensorV2``.
        seed: seeds both the pixels and the augmentation.
        stream: tells splits apart (train 0, val 1) so they hold different images.
    """

    def __init__(
        self, size: int, num_classes: int, side: int, transform: A.Compose, *, seed: int = 0, stream: int = 0
    ) -> None:
        super().__init__(transform, seed=seed)
        self.size, self.num_classes, self.side, self.stream = size, num_classes, side, stream
        self.labels = [index % num_classes for index in range(size)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} is out of range for {self.size} samples")
        label = self.labels[index]
        tint = np.random.default_rng([self.seed, 1_000_000 + label]).integers(0, 256, 3)
        noise = np.random.default_rng([self.seed, self.stream, index]).integers(0, 256, (self.side, self.side, 3))
        image = ((noise + tint) // 2).astype(np.uint8)
        return self._augment(image, index), label


@dataclass(frozen=True)
class DataSplits:
    """What `load_dataset` returns: datasets yielding ``(float tensor C x H x W, int label)``.

    Attributes:
        train: the training split (augmented).
        val: the validation split carved from train (stratified, seeded; evaluation transform).
        test: Food-101's official test split; None for the other datasets.
        classes: the class names, in label order.
    """

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset | None
    classes: list[str]

    @property
    def skipped(self) -> int:
        """Corrupt or unreadable images skipped so far in all splits, by any process (read it after each epoch)."""
        return sum(getattr(split, "skipped", 0) for split in (self.train, self.val, self.test) if split is not None)


def _by_class(labels: Sequence[int], seed: int) -> dict[int, list[int]]:
    """Sample indices per label, each list shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return {label: [indices[i] for i in rng.permutation(len(indices))] for label, indices in sorted(groups.items())}


def _stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into train and val; each class gives ``round(n * val_fraction)`` to val, at least one when
    it has two or more samples, and always keeps one for train. Both lists come back sorted."""
    val: list[int] = []
    for indices in _by_class(labels, seed).values():
        wanted = int(len(indices) * val_fraction + 0.5)
        if val_fraction > 0 and len(indices) >= 2:
            wanted = min(max(wanted, 1), len(indices) - 1)
        val += indices[:wanted]
    chosen = set(val)
    return [i for i in range(len(labels)) if i not in chosen], sorted(val)


def _stratified_subset(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` indices dealt round-robin over the classes (in a seeded order), so class counts differ by at most
    one wherever a class has enough samples. Returned sorted."""
    groups = list(_by_class(labels, seed).values())
    order = np.random.default_rng(seed + 1).permutation(len(groups)).tolist()
    chosen: list[int] = []
    for round_ in range(max((len(g) for g in groups), default=0)):
        for group in (groups[g] for g in order):
            if len(chosen) < count and round_ < len(group):
                chosen.append(group[round_])
    return sorted(chosen)


def _food101_root(data_dir: Path) -> Path:
    """Accept the folder that contains ``food-101/`` or ``food-101/`` itself."""
    if (data_dir / "meta").is_dir() or ((data_dir.name == "food-101") and not (data_dir / "food-101").exists()):
        return data_dir
    return data_dir / "food-101"


def _food101_missing(root: Path) -> str | None:
    """The first missing piece of the dataset at ``root``, as a sentence fragment; None when complete."""
    for needed in (root, root / "meta" / "classes.txt", root / "meta" / "train.txt", root / "meta" / "test.txt"):
        if not needed.exists():
            return f"'{needed}' is missing"
    classes = (root / "meta" / "classes.txt").read_text().split()
    present: set[str] = set()
    for name in classes:
        folder = root / "images" / name
        if not folder.is_dir():
            return f"'{folder}' is missing"
        present.update(f"{name}/{file.removesuffix('.jpg')}" for file in _listdir(folder))
    for split in ("train", "test"):
        absent = [line for line in (root / "meta" / f"{split}.txt").read_text().split() if line not in present]
        if absent:
            more = f" and {len(absent) - 1} more images listed in meta/{split}.txt are" if len(absent) > 1 else " is"
            return f"'{root / 'images' / absent[0]}.jpg'{more} missing"
    return None


def _listdir(folder: Path) -> list[str]:
    return [entry.name for entry in folder.iterdir()]


def _food101_samples(root: Path, split: str, class_index: dict[str, int]) -> _Samples:
    samples = []
    for line in (root / "meta" / f"{split}.txt").read_text().split():
        name = line.split("/", 1)[0]
        if name not in class_index:
            raise ValueError(f"meta/{split}.txt names class {name!r}, which meta/classes.txt lacks. Download again.")
        samples.append((str(root / "images" / f"{line}.jpg"), class_index[name]))
    return samples


def _load_food101(data_dir: str | Path | None, download: bool) -> tuple[list[str], _Samples, _Samples]:
    """Food-101's classes, official train samples and official test samples; downloads when asked to."""
    if data_dir is None:
        raise ValueError("Food-101 needs a data directory. Pass --data-dir DIR (add --download to fetch it there).")
    root = _food101_root(Path(data_dir).expanduser())
    missing = _food101_missing(root)
    if missing is not None and download:
        download_food101(root.parent, progress=sys.stderr.isatty())
        missing = _food101_missing(root)
    if missing is not None:
        command = f"autobatch train --dataset food-101 --data-dir {shlex.quote(str(root.parent))} --download"
        raise FileNotFoundError(f"Food-101 not found: {missing}. Download it with: {command}")
    classes = (root / "meta" / "classes.txt").read_text().split()
    class_index = {name: label for label, name in enumerate(classes)}
    return classes, _food101_samples(root, "train", class_index), _food101_samples(root, "test", class_index)


def _load_imagefolder(path: str) -> tuple[list[str], _Samples]:
    """Classes (sub-folder names, sorted) and the image files below each, sorted by path."""
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise FileNotFoundError(
            f"Image folder '{root}' not found. Pass --dataset imagefolder:DIR, where DIR has one sub-folder per class."
        )
    by_class = {
        folder.name: sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        for folder in sorted(root.iterdir())
        if folder.is_dir() and not folder.name.startswith(".")
    }
    classes = [name for name, files in by_class.items() if files]
    if not classes:
        raise FileNotFoundError(
            f"No images found in '{root}'. Put each class's .jpg/.png files in its own sub-folder, "
            f"e.g. '{root / 'cat' / '001.jpg'}'."
        )
    return classes, [(file, label) for label, name in enumerate(classes) for file in by_class[name]]


def _check_arguments(image_size: int, crop_pct: float, seed: int, val_fraction: float, dev: int | None) -> None:
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}. Pass a positive --image-size.")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}. Pass a non-negative --seed.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if dev is not None and dev < 1:
        raise ValueError(f"dev_samples must be >= 1, got {dev}. Pass a positive --dev-samples.")


def load_dataset(
    spec: str,
    data_dir: str | Path | None,
    *,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    crop_pct: float = 0.875,
    seed: int = 0,
    val_fraction: float = 0.1,
    dev_samples: int | None = None,
    download: bool = False,
    synthetic_sizes: tuple[int, int] = (512, 128),
    synthetic_classes: int = 10,
) -> DataSplits:
    """Build the train, val and (for Food-101) test datasets named by ``spec``.

    Args:
        spec: ``"food-101"`` (official layout under ``data_dir``), ``"imagefolder:PATH"`` (one sub-folder of images
            per class) or ``"synthetic"`` (random images, no files).
        data_dir: the folder containing ``food-101/`` (or that folder itself); only Food-101 uses it.
        image_size: the side of the square crops fed to the model.
        mean: per-channel normalisation mean, in 0-1 units (the model's, from timm).
        std: per-channel normalisation std, in 0-1 units.
        crop_pct: evaluation center-crop fraction: images are resized to ``int(image_size / crop_pct)`` first.
        seed: seeds the val split, the dev subset, synthetic pixels and every sample's augmentation.
        val_fraction: the fraction of each class's training samples held out for validation.
        dev_samples: keep only this many training samples, stratified by class (a quick test run).
        download: fetch Food-101 into ``data_dir`` when it is missing or incomplete.
        synthetic_sizes: ``(train, val)`` sample counts of ``"synthetic"``.
        synthetic_classes: the number of classes of ``"synthetic"``.

    Returns:
        The splits; ``test`` is None except for Food-101.

    Raises:
        FileNotFoundError: the dataset is missing or incomplete (the message says how to get it).
        ValueError: an unknown ``spec`` or an out-of-range argument.

    Example:
        >>> splits = load_dataset("synthetic", None, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        >>> len(splits.train), len(splits.val), len(splits.classes), splits.train[0][0].shape
        (512, 128, 10, torch.Size([3, 32, 32]))
    """
    _check_arguments(image_size, crop_pct, seed, val_fraction, dev_samples)
    train_transform = make_train_transform(image_size, mean, std)
    eval_transform = make_eval_transform(image_size, mean, std, crop_pct)
    if spec == "synthetic":
        train_size, val_size = synthetic_sizes
        train_size = min(train_size, dev_samples) if dev_samples is not None else train_size
        side = max(image_size, int(image_size / crop_pct))
        return DataSplits(
            train=SyntheticDataset(train_size, synthetic_classes, side, train_transform, seed=seed, stream=0),
            val=SyntheticDataset(val_size, synthetic_classes, side, eval_transform, seed=seed, stream=1),
            test=None,
            classes=[f"class_{label}" for label in range(synthetic_classes)],
        )
    test: ImageDataset | None = None
    if spec == "food-101":
        classes, samples, test_samples = _load_food101(data_dir, download)
        test = ImageDataset(test_samples, eval_transform, seed=seed)
    elif spec.startswith("imagefolder:"):
        classes, samples = _load_imagefolder(spec.removeprefix("imagefolder:"))
    else:
        raise ValueError(f"Unknown dataset {spec!r}. Use 'food-101', 'imagefolder:PATH' or 'synthetic'.")
    train_indices, val_indices = _stratified_split([label for _, label in samples], val_fraction, seed)
    if dev_samples is not None:
        train_labels = [samples[i][1] for i in train_indices]
        train_indices = [train_indices[i] for i in _stratified_subset(train_labels, dev_samples, seed)]
    return DataSplits(
        train=ImageDataset([samples[i] for i in train_indices], train_transform, seed=seed),
        val=ImageDataset([samples[i] for i in val_indices], eval_transform, seed=seed),
        test=test,
        classes=classes,
    )


# --- loaders -------------------------------------------------------------------------------------------------
# Data loaders whose order and augmentation depend only on (seed, epoch, index), so a resumed run sees the
# same batches as an uninterrupted one, whatever the number of workers.


def load_splits(config: TrainConfig, data_config: dict[str, Any]) -> Any:
    return load_dataset(
        config.dataset,
        config.data_dir,
        image_size=config.image_size,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        seed=config.seed,
        val_fraction=config.val_fraction,
        dev_samples=config.dev_samples,
        download=config.download,
    )


class _EpochIndexed(Dataset):
    """Reads ``(epoch, index)`` keys: sets the dataset's epoch in whichever process loads the sample.

    Persistent workers keep their own copy of the dataset, so a ``set_epoch`` in the main process would not
    reach them; carrying the epoch with every index does, and makes each sample's augmentation depend only
    on (seed, epoch, index).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if epoch != self._epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            self._epoch = epoch
        return self.dataset[index]


class EpochBatches:
    """The training order: a seeded permutation per epoch, cut into full batches, from any position.

    ``set_position(epoch, start)`` picks the epoch and how many of its batches to skip (a resumed run);
    the order depends only on (seed, epoch), never on workers or the global RNG. Under torchrun each
    global batch is ``batch_size x ranks`` samples and rank r takes the r-th slice of it, so N ranks see
    exactly the samples one process would with an N times larger batch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, ranks: int = 1) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.ranks = rank, ranks
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.ranks)  # drop_last: every update sees a full batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist()
        for batch in range(self.start, self.batches_per_epoch()):
            first = (batch * self.ranks + self.rank) * self.batch_size
            chunk = order[first : first + self.batch_size]
            yield [(self.epoch, index) for index in chunk]


def _loader_options(workers: int, pin_memory: bool, spawn: bool, seed: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin_memory,
        # Worker seeds from a generator of their own, so creating an iterator never draws from the global
        # RNG (a resumed run creates its iterators at other points than an uninterrupted one).
        "generator": torch.Generator().manual_seed(seed),
    }
    if workers > 0:
        options["persistent_workers"] = True
        if spawn:
            options["multiprocessing_context"] = "spawn"
    return options


def train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    workers: int,
    pin_memory: bool,
    spawn: bool,
    rank: int = 0,
    ranks: int = 1,
) -> tuple[DataLoader, EpochBatches]:
    """The training loader (this rank's optimisation batches of ``batch_size``) and the sampler that positions it."""
    sampler = EpochBatches(len(dataset), batch_size, seed, rank, ranks)  # type: ignore[arg-type]
    loader = DataLoader(
        _EpochIndexed(dataset), batch_sampler=sampler, **_loader_options(workers, pin_memory, spawn, seed)
    )
    return loader, sampler


def eval_loader(
    dataset: Dataset, batch_size: int, *, workers: int, pin_memory: bool, spawn: bool, rank: int = 0, ranks: int = 1
) -> DataLoader:
    """The evaluation loader: every sample once, in order (under torchrun, every ``ranks``-th from ``rank``)."""
    if ranks > 1:
        dataset = Subset(dataset, range(rank, len(dataset), ranks))  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_options(workers, pin_memory, spawn, 0))


def train_batches(loader: DataLoader, sampler: EpochBatches, epoch: int, start: int) -> Iterator[Any]:
    """Optimisation batches from (epoch, start) on, epoch after epoch."""
    while True:
        sampler.set_position(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


# --- the Food-101 download -----------------------------------------------------------------------------------
# Fetch the official Food-101 archive: resumable, size- and md5-checked, safely extracted.
#
# Only the standard library talks to the server (urllib), so the download adds no dependency; the progress bar
# (rich) is drawn only when asked for.

# The official archive and its published size and checksum (REFERENCE.md F).
FOOD101_URL = "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
FOOD101_SIZE = 4_996_278_331
FOOD101_MD5 = "85eeb15f3717b99a5da872d97d918f87"

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0
# tarfile's extraction filters (PEP 706) arrived in 3.12 and were backported to 3.10.12 and 3.11.4.
_FILTER_ERRORS: tuple[type[Exception], ...] = (tarfile.FilterError,) if hasattr(tarfile, "FilterError") else ()


class DownloadError(AutobatchError):
    """A download that could not finish: no connection, a cut-off transfer, a wrong size or checksum."""


@contextmanager
def _progress_bar(enabled: bool, *, total: int, done: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_bytes)``; a rich bar on stderr when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda n_bytes: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n_bytes: bar.advance(task, n_bytes)


def _stopped(url: str, got: int, size: int, reason: str = "") -> str:
    return f"Download of {url} stopped at {got:,} of {size:,} bytes{reason}. Run the command again to resume."


def _reported_total(response: http.client.HTTPResponse, start: int) -> int | None:
    """The whole file's size as the server states it (``Content-Range`` for a resumed transfer)."""
    content_range = response.headers.get("Content-Range", "")
    if response.status == 206 and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return start + int(length) if length is not None else None


def _open(url: str, start: int, *, part: Path, data_dir: Path) -> http.client.HTTPResponse:
    """Open ``url``, asking for the bytes from ``start`` on (an HTTP Range request) when resuming."""
    headers = {"Range": f"bytes={start}-"} if start else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the partial file is not a prefix of the server's file
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} refused to resume from byte {start:,}; the partial download was removed. Run the command again."
            ) from exc
        raise DownloadError(
            f"{url} answered HTTP {exc.code} ({exc.reason}). Check the URL, or try again later."
        ) from exc
    except OSError as exc:  # URLError, refused connections and timeouts
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"Cannot reach {url}: {reason}. Download it elsewhere and extract it into {data_dir}, "
            "or check your connection."
        ) from exc


def _fetch(url: str, part: Path, *, size: int, progress: bool, data_dir: Path) -> None:
    """Download ``url`` into ``part``, continuing a partial file when the server allows it."""
    start = part.stat().st_size if part.exists() else 0
    if start > size:
        part.unlink()
        start = 0
    if start == size:
        return
    with _open(url, start, part=part, data_dir=data_dir) as response:
        if response.status != 206:  # the server ignored the Range header: start over
            start = 0
        total = _reported_total(response, start)
        if total is not None and total != size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url} serves {total:,} bytes, expected {size:,}. Check the URL and the expected size."
            )
        with (
            part.open("ab" if start else "wb") as file,
            _progress_bar(progress, total=size, done=start, label="food-101.tar.gz") as advance,
        ):
            try:
                while chunk := response.read(_CHUNK_BYTES):
                    file.write(chunk)
                    advance(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                file.flush()
                raise DownloadError(_stopped(url, part.stat().st_size, size, f" ({exc!r})")) from exc


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, *, url: str, size: int, md5: str) -> None:
    """Check size and md5; a file that can never become right is removed, a short one kept for resuming."""
    got = path.stat().st_size
    if got < size:
        raise DownloadError(_stopped(url, got, size))
    if got > size:
        path.unlink()
        raise DownloadError(f"'{path}' is {got:,} bytes, expected {size:,}; removed it. Run the command again.")
    digest = _md5(path)
    if digest != md5:
        path.unlink()
        raise DownloadError(
            f"Checksum mismatch for '{path}': md5 {digest}, expected {md5}. "
            "The corrupt download was removed; run the command again."
        )


def _check_members(tar: tarfile.TarFile) -> None:
    """Refuse absolute paths, '..' and links: the check ``filter="data"`` does, for Pythons without it."""
    for member in tar.getmembers():
        path = Path(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise DownloadError(f"Archive entry {member.name!r} is unsafe to extract; nothing was extracted.")


def _extract(archive: Path, data_dir: Path) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(data_dir, filter="data")
            else:  # pragma: no cover - Python < 3.10.12 / 3.11.4
                _check_members(tar)
                tar.extractall(data_dir)
    except _FILTER_ERRORS as exc:
        raise DownloadError(f"Archive '{archive}' holds an unsafe entry ({exc}); extraction stopped.") from exc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DownloadError(
            f"Archive '{archive}' cannot be read ({exc}). Delete it and run the command again."
        ) from exc


def download_food101(
    data_dir: str | Path,
    *,
    url: str = FOOD101_URL,
    md5: str = FOOD101_MD5,
    size: int = FOOD101_SIZE,
    progress: bool = True,
) -> Path:
    """Download, check and extract Food-101 into ``data_dir``, resuming an earlier cut-off transfer.

    The archive (about 5 GB) is written to ``data_dir/food-101.tar.gz.part``; a rerun after a cut-off continues with
    an HTTP Range request. Once its size and md5 match it is renamed ``food-101.tar.gz``, extracted (members that
    would land outside ``data_dir`` are refused) and deleted, since a complete dataset never needs it again.

    Args:
        data_dir: the folder that will contain ``food-101/``; created if missing.
        url: where to fetch the archive.
        md5: the archive's expected md5 (hex).
        size: the archive's expected size in bytes.
        progress: draw a rich progress bar on stderr.

    Returns:
        The extracted dataset folder, ``data_dir/food-101``.

    Raises:
        DownloadError: the server cannot be reached, the transfer was cut off (rerun to resume), the size or md5
            is wrong (the bad file is removed), or the archive cannot be extracted safely.
    """
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / "food-101.tar.gz"
    if archive.exists():  # checked before, then extraction was interrupted
        _verify(archive, url=url, size=size, md5=md5)
    else:
        part = data_dir / "food-101.tar.gz.part"
        _fetch(url, part, size=size, progress=progress, data_dir=data_dir)
        _verify(part, url=url, size=size, md5=md5)
        part.replace(archive)
    _extract(archive, data_dir)
    folder = data_dir / "food-101"
    if not folder.is_dir():
        raise DownloadError(f"Archive '{archive}' holds no 'food-101' folder. Check the URL.")
    archive.unlink()
    return folder
