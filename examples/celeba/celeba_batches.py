"""CelebA's three splits as batch sources for :func:`dstmtl.study.run_study`.

A source is called as ``source(epoch=..., seed=..., rank=..., world_size=...)`` and gives
that epoch's batches of ``(float images [B, 3, S, S], labels [B, K])`` on the device,
already normalised (:func:`image_cache.prepare_batch`). The training source shuffles and
flips with generators seeded by ``seed * 1000 + epoch`` only, so every method of a seed
sees the same batches, and a resumed run the batches an uninterrupted one sees.

Two ways to the same preprocessing: the uint8 cache (:func:`image_cache.build_cache`,
batched by :class:`image_cache.DeviceBatches`), or, with ``cache=False``, the JPEGs
decoded every epoch by ``DataLoader`` workers. Either way every image is decoded once here,
before the study starts, so a broken image stops the start instead of a run hours in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from celeba_files import SPLIT_NAMES, CelebAError, CelebASplit
from image_cache import (
    DeviceBatches,
    ImageFolderDataset,
    UInt8Array,
    build_cache,
    check_images,
    fits_on_device,
    prepare_batch,
)
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["celeba_batches"]

Batches = Iterable[tuple[Tensor, Tensor]]


def celeba_batches(
    splits: Mapping[str, CelebASplit],
    image_dir: Path,
    *,
    crop: int | None,
    image_size: int,
    batch_size: int,
    device: torch.device,
    flip: bool = True,
    normalise: bool = True,
    cache: bool = True,
    cache_dir: Path,
    workers: int | None = None,
    progress: bool = True,
    first_rank: Callable[[Callable[[], None]], None] = lambda work: work(),
) -> dict[str, Callable[..., Batches]]:
    """The ``train``, ``valid`` and ``test`` batch sources of ``splits``.

    Each image is centre-cropped to ``crop`` pixels (``None``: the whole image) and resized
    to ``image_size``; ``flip`` mirrors half the training images each epoch, ``normalise``
    standardises with the ImageNet statistics (else the pixel values over 255). A source's
    ``targets`` are its split's labels ``[N, K]``, which the harness reads for the majority
    baseline and DST's label counts instead of going through the images.

    Decodes every image first (into the cache under ``cache_dir``, or, with
    ``cache=False``, only to check it), which raises :class:`CelebAError` naming a
    missing or broken image. ``first_rank(work)`` runs ``work`` on the first process only
    and waits for it (under torchrun, so that one process builds the cache); ``workers``
    decode in parallel (every usable core by default, 0 for this process).
    """
    sources: dict[str, Callable[..., Batches]] = {}
    for name in SPLIT_NAMES:
        split, train = splits[name], name == "train"
        paths = split.image_paths(image_dir)

        def decode(paths: list[Path] = paths, name: str = name) -> None:
            if cache:
                build_cache(
                    paths,
                    cache_dir,
                    crop=crop,
                    image_size=image_size,
                    workers=workers,
                    desc=f"caching {name}",
                    progress=progress,
                )
            else:
                check_images(
                    paths,
                    crop=crop,
                    image_size=image_size,
                    workers=workers,
                    desc=f"checking {name}",
                    progress=progress,
                )

        first_rank(decode)
        prepare = _Prepare(device, train and flip, normalise)
        if cache:
            # Opens what the first process built.
            images = build_cache(paths, cache_dir, crop=crop, image_size=image_size)
            sources[name] = _CachedSource(images, split.labels, batch_size, prepare, train)
        else:
            dataset = ImageFolderDataset(paths, split.labels, crop=crop, image_size=image_size)
            sources[name] = _JpegSource(dataset, split.labels, batch_size, prepare, train, workers)
    return sources


@dataclass(frozen=True)
class _Prepare:
    """Where the batches go and how they are prepared there."""

    device: torch.device
    flip: bool
    normalise: bool


class _Epoch:
    """One epoch's batches, prepared on the device, with their count for the progress bar.

    Iterating starts the pass; the flips are drawn from a generator seeded by ``number``.
    A :class:`CelebAError` of a ``DataLoader`` worker (an image changed after the check)
    comes back with the worker's traceback as its message; it is raised again with its own
    message.
    """

    def __init__(self, batches: Batches, length: int, prepare: _Prepare, number: int) -> None:
        self._batches, self._length = batches, length
        self._prepare, self._number = prepare, number

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        device = self._prepare.device
        # A device generator: the flips are drawn where the images are, without a sync.
        flips = torch.Generator(device).manual_seed(self._number) if self._prepare.flip else None
        try:
            for images, labels in self._batches:
                inputs = prepare_batch(
                    images.to(device, non_blocking=True),
                    train=self._prepare.flip,
                    generator=flips,
                    normalise=self._prepare.normalise,
                )
                yield inputs, labels.to(device, non_blocking=True)
        except CelebAError as error:
            _, marker, original = str(error).rpartition(f"{CelebAError.__name__}: ")
            if not marker:
                raise
            raise CelebAError(original.strip()) from error


class _CachedSource:
    """Batches of the uint8 cache: one :class:`DeviceBatches` per shard, kept (a preloaded
    one holds the split on the device)."""

    def __init__(
        self,
        images: UInt8Array,
        labels: npt.NDArray[np.float32],
        batch_size: int,
        prepare: _Prepare,
        shuffle: bool,
    ) -> None:
        self.targets = torch.from_numpy(labels)
        self._images, self._labels, self._batch_size = images, labels, batch_size
        self._prepare, self._shuffle = prepare, shuffle
        self._preload = fits_on_device(images.nbytes, prepare.device)
        self._shards: dict[tuple[int, int], DeviceBatches] = {}

    def __call__(self, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> _Epoch:
        key = (rank, world_size)
        if key not in self._shards:
            self._shards[key] = DeviceBatches(
                self._images,
                self._labels,
                batch_size=self._batch_size,
                device=self._prepare.device,
                shuffle=self._shuffle,
                rank=rank,
                world_size=world_size,
                preload=self._preload,
            )
        batches = self._shards[key]
        # One number per (seed, epoch) pair, so that no two seeds share an order.
        number = seed * 1000 + epoch
        batches.set_epoch(number)
        return _Epoch(batches, len(batches), self._prepare, number)


class _JpegSource:
    """The path without a cache: ``DataLoader`` workers decode every JPEG each epoch."""

    def __init__(
        self,
        dataset: ImageFolderDataset,
        labels: npt.NDArray[np.float32],
        batch_size: int,
        prepare: _Prepare,
        shuffle: bool,
        workers: int | None,
    ) -> None:
        self.targets = torch.from_numpy(labels)
        self._dataset, self._batch_size = dataset, batch_size
        self._prepare, self._shuffle = prepare, shuffle
        self._workers = workers if workers is not None else os.cpu_count() or 1

    def __call__(self, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> _Epoch:
        number = seed * 1000 + epoch
        # drop_last, as DeviceBatches shards: up to world_size - 1 images sit out an epoch,
        # rather than padding the shards with repeated images.
        sampler: DistributedSampler[int] | None = None
        if self._shuffle and world_size > 1:
            sampler = DistributedSampler(
                self._dataset, world_size, rank, shuffle=True, seed=0, drop_last=True
            )
            sampler.set_epoch(number)
        loader = DataLoader(
            self._dataset,
            batch_size=self._batch_size,
            shuffle=self._shuffle and sampler is None,
            sampler=sampler,
            generator=torch.Generator().manual_seed(number),
            num_workers=self._workers,
            pin_memory=self._prepare.device.type == "cuda",
        )
        return _Epoch(loader, len(loader), self._prepare, number)
