"""Data loaders whose order and augmentation depend only on (seed, epoch, index), so a resumed run sees the
same batches as an uninterrupted one, whatever the number of workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .config import TrainConfig

__all__ = ["EpochBatches", "eval_loader", "load_splits", "train_batches", "train_loader"]


def load_splits(config: TrainConfig, data_config: dict[str, Any]) -> Any:
    from .data import load_dataset

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
