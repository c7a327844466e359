"""Decode CelebA once into a uint8 cache, then batch it straight onto the device.

Decoding 200k JPEGs every epoch costs far more than the small models of this
example need for a step, so each split is decoded once, at training
resolution, into a memory-mapped ``.npy`` file that later runs reuse. Batches
are then gathered from that file on the host (or from a device-resident copy)
and augmented and normalised on the device by :func:`prepare_batch`.

Policy for bad images: a missing, truncated or otherwise undecodable JPEG
stops the cache build with a :class:`CelebAError` naming the file, rather than
silently training on fewer or blank images.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torchvision.transforms.v2.functional as TF
from celeba_files import CelebAError
from celeba_workers import run_chunks
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from dstmtl.study._atomic import replacing

# Part of the cache key: bump it whenever the preprocessing changes, so caches
# written by older code are rebuilt instead of silently reused.
_CACHE_VERSION = 1
# Big enough to amortise task overhead in the process pool, small enough for
# a smooth progress bar and to spread the tail evenly over the workers.
_CHUNK_SIZE = 256
# The standard ImageNet statistics, which pretrained torchvision backbones expect.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"

UInt8Array = npt.NDArray[np.uint8]


def decode_image(path: Path, *, crop: int | None, image_size: int) -> torch.Tensor:
    """Decode one JPEG, centre-crop it to ``crop`` pixels and resize to ``image_size``.

    ``crop=None`` resizes the whole image to the square (squeezing CelebA's height).

    Returns a uint8 tensor of shape [3, image_size, image_size].
    """
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec and
            # warns on every call; one warning per image would bury the output.
            warnings.filterwarnings(
                "ignore", message=_TORCHVISION_IO_DEPRECATION, category=DeprecationWarning
            )
            image: torch.Tensor = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    except (OSError, RuntimeError) as error:
        raise CelebAError(
            f"Cannot decode image {path}: {error}. The file is missing, truncated or not "
            f"a JPEG; restore it from the CelebA download (or regenerate the demo data)."
        ) from error
    height, width = image.shape[-2:]
    if crop is not None:
        if crop > min(height, width):
            raise CelebAError(
                f"Crop size {crop} is larger than image {path} ({width}x{height}). "
                f"Use a crop of at most {min(height, width)} pixels."
            )
        image = TF.center_crop(image, [crop, crop])
    resized: torch.Tensor = TF.resize(image, [image_size, image_size], antialias=True)
    return resized


def build_cache(
    paths: Sequence[Path],
    cache_dir: Path,
    *,
    crop: int | None,
    image_size: int,
    workers: int | None = None,
    desc: str = "Caching images",
    progress: bool = True,
) -> np.memmap[Any, np.dtype[np.uint8]]:
    """Return a read-only uint8 array [N, 3, S, S] of the preprocessed images.

    The cache file name depends on the crop, the size and a hash of the files
    (paths, sizes and modification times), so a later run with the same settings
    and files reuses it, and a run with other settings, or after the images were
    replaced (the demo data generated again with another seed), builds its own.
    A missing image raises :class:`CelebAError` before any work. ``workers`` defaults to the
    number of usable CPU cores; 0 or 1 decodes in this process.
    """
    if not paths:
        raise CelebAError(f"No images to cache for {desc!r}: the split is empty.")
    if (crop is not None and crop < 1) or image_size < 1:
        raise CelebAError(
            f"Crop ({crop}) and image size ({image_size}) must be positive pixel counts."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = (len(paths), 3, image_size, image_size)
    cropped = "whole" if crop is None else f"crop{crop}"
    cache_file = cache_dir / f"images_n{len(paths)}_{cropped}_s{image_size}_{_key(paths)}.npy"
    cached = _open_cache(cache_file, shape)
    if cached is not None:
        return cached

    # Decode into a private temporary name and rename it into place only when
    # complete: an interrupted build (or one racing another process) can then
    # never leave a half-written file under the name a later run would reuse.
    with replacing(cache_file) as temporary:
        np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape).flush()
        _fill(temporary, [str(path) for path in paths], crop, image_size, workers, desc, progress)
    opened = _open_cache(cache_file, shape)
    if opened is None:
        raise CelebAError(
            f"The image cache {cache_file} was written but cannot be read back. "
            f"Check free disk space and delete {cache_dir} to rebuild it."
        )
    return opened


def _key(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}\0".encode())
    for path, stat in zip(paths, _stat_images(paths), strict=True):
        # Absolute paths so that runs from different working directories agree.
        digest.update(f"{path.absolute()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _stat_images(paths: Sequence[Path]) -> list[os.stat_result]:
    """Each image's stat, or a :class:`CelebAError` that counts the missing ones.

    A stat per file costs about a second for all of CelebA.
    """
    stats: list[os.stat_result] = []
    missing: list[Path] = []
    for path in paths:
        try:
            stats.append(path.stat())
        except FileNotFoundError:
            missing.append(path)
    if missing:
        raise CelebAError(
            f"{len(missing)} of {len(paths)} images are missing, e.g. {missing[0]}; restore "
            "them from the CelebA download (or regenerate the demo data)"
        )
    return stats


def _open_cache(
    cache_file: Path, shape: tuple[int, ...]
) -> np.memmap[Any, np.dtype[np.uint8]] | None:
    if not cache_file.is_file():
        return None
    try:
        array = np.load(cache_file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if not isinstance(array, np.memmap) or array.shape != shape or array.dtype != np.uint8:
        return None
    return array


def _fill(
    cache_file: Path | None,
    paths: list[str],
    crop: int | None,
    image_size: int,
    workers: int | None,
    desc: str,
    show_progress: bool,
) -> None:
    chunks = [
        (start, paths[start : start + _CHUNK_SIZE]) for start in range(0, len(paths), _CHUNK_SIZE)
    ]
    target = None if cache_file is None else str(cache_file)
    decode = functools.partial(_decode_chunk, target, crop, image_size)
    run_chunks(decode, chunks, total=len(paths), workers=workers, desc=desc, progress=show_progress)


def _decode_chunk(
    cache_file: str | None, crop: int | None, image_size: int, chunk: tuple[int, list[str]]
) -> int:
    """Decode a chunk of images into rows ``start...`` of the cache, or only decode them
    (``cache_file=None``) to find a broken one."""
    start, paths = chunk
    array = None if cache_file is None else np.load(cache_file, mmap_mode="r+")
    for offset, path in enumerate(paths):
        image = decode_image(Path(path), crop=crop, image_size=image_size)
        if array is not None:
            array[start + offset] = image.numpy()
    if array is not None:
        array.flush()
    return len(paths)


def check_images(
    paths: Sequence[Path],
    *,
    crop: int | None,
    image_size: int,
    workers: int | None = None,
    desc: str = "Checking images",
    progress: bool = True,
) -> None:
    """Decode every image as :func:`build_cache` does, keeping nothing: a missing,
    truncated or undecodable JPEG (or one smaller than ``crop``) raises the
    :class:`CelebAError` the cache build would raise, before any training.

    For the path without a cache, which would otherwise find a broken image only when an
    epoch reads it, after the study was recorded.
    """
    if not paths:
        raise CelebAError(f"No images to check for {desc!r}: the split is empty.")
    _stat_images(paths)
    _fill(None, [str(path) for path in paths], crop, image_size, workers, desc, progress)


class DeviceBatches:
    """Batches of (uint8 images, float labels) on ``device``, from a host uint8 array.

    Every epoch is a permutation of the rows (or the identity without
    ``shuffle``) drawn from ``seed + epoch``, so all ranks agree on it; rank
    ``r`` of ``world_size`` takes the ``r``-th of ``world_size`` equal,
    disjoint blocks of it. Equal shards keep the number of steps identical on
    every rank (unequal counts deadlock collective operations), so the last
    ``N % world_size`` rows of each epoch's permutation are left out.

    Like ``DistributedSampler``, :meth:`set_epoch` chooses the permutation; in
    addition each ``iter()`` moves on to the next epoch, so forgetting to call
    it does not repeat the same order.

    Host path: a background thread gathers the next batches' rows from the
    (memory-mapped) array into pinned buffers while the device works on the
    current one; the copies to the device are asynchronous. With ``preload``
    the whole array is copied to the device once and batches are gathered
    there.
    """

    def __init__(
        self,
        images: UInt8Array,
        labels: npt.NDArray[np.float32],
        *,
        batch_size: int,
        device: torch.device | str,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        preload: bool = False,
        prefetch: int = 2,
    ) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be a uint8 array [N, 3, S, S], got {images.dtype} {images.shape}"
            )
        if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be [N, K] with N = {images.shape[0]} rows, got {labels.shape}"
            )
        if batch_size < 1 or prefetch < 1:
            raise ValueError(
                f"batch_size ({batch_size}) and prefetch ({prefetch}) must be at least 1"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if images.shape[0] < world_size:
            raise ValueError(f"{images.shape[0]} images cannot be shared among {world_size} ranks")
        self._images = images
        self._labels = np.ascontiguousarray(labels, dtype=np.float32)
        self._batch_size = batch_size
        self._device = torch.device(device)
        self._shuffle = shuffle
        self._seed = seed
        self._drop_last = drop_last
        self._rank = rank
        self._world_size = world_size
        self._prefetch = prefetch
        self._shard_size = int(images.shape[0]) // world_size
        self._epoch = 0
        self._device_images = _to_device(images, self._device) if preload else None
        self._device_labels = torch.from_numpy(self._labels).to(self._device) if preload else None

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        if self._drop_last:
            return self._shard_size // self._batch_size
        return math.ceil(self._shard_size / self._batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Decide the epoch now, not on the first next(), so that iter() order
        # alone determines which permutation a pass gets.
        shard = self._shard_indices(self._epoch)
        self._epoch += 1
        starts = range(0, len(self) * self._batch_size, self._batch_size)
        # Each batch's rows in order: the host path reads the memory map front to back, and
        # both paths give the same batches, flipped alike, whichever one memory allows.
        for start in starts:
            shard[start : start + self._batch_size].sort()
        if self._device_images is not None and self._device_labels is not None:
            # One copy of the epoch's indices; the batches are slices of it.
            # Pinned and non-blocking: a plain copy would wait for the GPU every epoch.
            host_shard = torch.from_numpy(shard)
            if self._device.type == "cuda":
                host_shard = host_shard.pin_memory()
            device_shard = host_shard.to(self._device, non_blocking=True)
            return self._iter_preloaded(
                device_shard, starts, self._device_images, self._device_labels
            )
        return self._iter_host([shard[start : start + self._batch_size] for start in starts])

    def _shard_indices(self, epoch: int) -> npt.NDArray[np.int64]:
        n = int(self._images.shape[0])
        if self._shuffle:
            generator = torch.Generator().manual_seed(self._seed + epoch)
            order = torch.randperm(n, generator=generator).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        start = self._rank * self._shard_size
        return order[start : start + self._shard_size]

    def _iter_preloaded(
        self,
        shard: torch.Tensor,
        starts: range,
        images: torch.Tensor,
        labels: torch.Tensor,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in starts:
            index = shard[start : start + self._batch_size]
            yield images.index_select(0, index), labels.index_select(0, index)

    def _iter_host(
        self, batches: list[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="DeviceBatches")
        try:
            pending: deque[Future[tuple[torch.Tensor, torch.Tensor]]] = deque(
                pool.submit(self._gather, indices) for indices in batches[: self._prefetch]
            )
            queued = len(pending)
            while pending:
                host_images, host_labels = pending.popleft().result()
                if queued < len(batches):
                    pending.append(pool.submit(self._gather, batches[queued]))
                    queued += 1
                yield (
                    host_images.to(self._device, non_blocking=True),
                    host_labels.to(self._device, non_blocking=True),
                )
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _gather(self, indices: npt.NDArray[np.int64]) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self._device.type == "cuda"
        images = torch.empty(
            (len(indices), *self._images.shape[1:]), dtype=torch.uint8, pin_memory=pin
        )
        labels = torch.empty(
            (len(indices), self._labels.shape[1]), dtype=torch.float32, pin_memory=pin
        )
        # mode="clip" lets numpy write straight into the pinned buffer; "raise"
        # would go through a temporary copy. The indices are in range anyway.
        np.take(self._images, indices, axis=0, out=images.numpy(), mode="clip")
        np.take(self._labels, indices, axis=0, out=labels.numpy(), mode="clip")
        return images, labels


def _to_device(images: UInt8Array, device: torch.device) -> torch.Tensor:
    result = torch.empty(images.shape, dtype=torch.uint8, device=device)
    # Copy in slices so a memory-mapped array is never duplicated whole in host
    # memory on its way to the device.
    step = 4096
    for start in range(0, images.shape[0], step):
        # A copy: a slice of a read-only memory map would make torch warn.
        block = np.array(images[start : start + step])
        result[start : start + step].copy_(torch.from_numpy(block))
    return result


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``preload`` should be used: a GPU with ``nbytes`` under half its free memory.

    The other half is left for training.
    """
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < 0.5 * free


class ImageFolderDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Decode each image on access, for a plain ``DataLoader`` instead of the cache.

    Yields the same uint8 [3, S, S] images as the cache, with float labels [K].
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: npt.NDArray[np.float32],
        *,
        crop: int | None,
        image_size: int,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} label rows")
        # Decoding happens during training, so a missing file would otherwise stop a run
        # hours in.
        _stat_images(paths)
        self._paths = list(paths)
        self._labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
        self._crop = crop
        self._image_size = image_size

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(self._paths[index], crop=self._crop, image_size=self._image_size)
        return image, self._labels[index]


def prepare_batch(
    images_uint8: torch.Tensor,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    channels_last: bool = True,
    normalise: bool = True,
) -> torch.Tensor:
    """Turn a uint8 batch [B, 3, S, S] into float input, on its device: standardised with
    the ImageNet channel statistics, or with ``normalise=False`` the pixel values over 255.

    In training, each image is mirrored left-right with probability 1/2.
    ``generator`` (if given) must live on the images' device. Nothing here
    waits for the device, so it can be queued behind the previous step.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(
            f"prepare_batch expects uint8 images [B, 3, S, S], got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    images = images_uint8
    if train:
        flip = (
            torch.rand((images.shape[0], 1, 1, 1), device=images.device, generator=generator) < 0.5
        )
        images = torch.where(flip, images.flip(-1), images)
    if channels_last:
        # Convert while still one byte per value; the float ops keep the layout.
        images = images.contiguous(memory_format=torch.channels_last)
    if not normalise:
        return images.float().mul_(1 / 255)
    scale, shift = _normalisation(images.device)
    # (x / 255 - mean) / std folded into one multiply and one subtract.
    return images.float().mul_(scale).sub_(shift)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
    return (1 / (255 * std)).to(device), (mean / std).to(device)
