"""Tests for the uint8 image cache, the device batch iterator and batch preparation."""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import image_cache
import numpy as np
import numpy.typing as npt
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from celeba_files import DEFAULT_ATTRIBUTES, CelebAError, load_splits, locate
from hypothesis import given, settings
from hypothesis import strategies as st
from image_cache import (
    DeviceBatches,
    ImageFolderDataset,
    build_cache,
    check_images,
    prepare_batch,
)
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg, read_file

CROP = 178
SIZE = 32

# The reference decoding below calls torchvision's deprecated decoder directly.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


@pytest.fixture(scope="module")
def demo_paths(demo_root: Path) -> list[Path]:
    files = locate(demo_root)
    return load_splits(files, DEFAULT_ATTRIBUTES)["valid"].image_paths(files.image_dir)


def _reference(path: Path, crop: int, size: int) -> npt.NDArray[np.uint8]:
    """The preprocessing spelled out independently of the module under test."""
    image = decode_jpeg(read_file(str(path)))
    image = TF.center_crop(image, [crop, crop])
    resized: torch.Tensor = TF.resize(image, [size, size], antialias=True)
    return resized.numpy()


def _file_of(cache: np.memmap[Any, np.dtype[np.uint8]]) -> Path:
    assert cache.filename is not None
    return Path(cache.filename)


# --- cache build -----------------------------------------------------------------


def test_cache_matches_direct_decoding(demo_paths: list[Path], tmp_path: Path) -> None:
    cache = build_cache(demo_paths, tmp_path, crop=CROP, image_size=SIZE, workers=1)
    assert cache.shape == (len(demo_paths), 3, SIZE, SIZE)
    assert cache.dtype == np.uint8
    assert not cache.flags.writeable
    for index in (0, 7, len(demo_paths) - 1):
        np.testing.assert_array_equal(cache[index], _reference(demo_paths[index], CROP, SIZE))
    assert [path.name for path in tmp_path.iterdir()] == [_file_of(cache).name]


def test_smaller_crop_zooms_in(demo_paths: list[Path], tmp_path: Path) -> None:
    cache = build_cache(demo_paths[:3], tmp_path, crop=120, image_size=SIZE, workers=1)
    np.testing.assert_array_equal(cache[2], _reference(demo_paths[2], 120, SIZE))


def test_second_build_reuses_the_file(
    demo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_cache(demo_paths, tmp_path, crop=CROP, image_size=SIZE, workers=1)
    modified = os.stat(_file_of(first)).st_mtime_ns

    def must_not_decode(path: Path, *, crop: int, image_size: int) -> torch.Tensor:
        raise AssertionError(f"decoded {path} although the cache exists")

    monkeypatch.setattr(image_cache, "decode_image", must_not_decode)
    second = build_cache(demo_paths, tmp_path, crop=CROP, image_size=SIZE, workers=1)
    assert second.filename == first.filename
    assert os.stat(_file_of(second)).st_mtime_ns == modified
    np.testing.assert_array_equal(second, first)


def test_other_settings_or_files_get_their_own_cache(
    demo_paths: list[Path], tmp_path: Path
) -> None:
    base = build_cache(demo_paths, tmp_path, crop=CROP, image_size=SIZE, workers=1)
    bigger = build_cache(demo_paths, tmp_path, crop=CROP, image_size=SIZE + 8, workers=1)
    cropped = build_cache(demo_paths, tmp_path, crop=150, image_size=SIZE, workers=1)
    fewer = build_cache(demo_paths[1:], tmp_path, crop=CROP, image_size=SIZE, workers=1)
    names = {_file_of(array).name for array in (base, bigger, cropped, fewer)}
    assert len(names) == 4
    assert bigger.shape[-1] == SIZE + 8
    np.testing.assert_array_equal(fewer, base[1:])


def test_parallel_build_equals_serial_build(
    demo_paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serial = build_cache(demo_paths, tmp_path / "serial", crop=CROP, image_size=SIZE, workers=1)
    # Several chunks per worker, so the pool really splits the work.
    monkeypatch.setattr(image_cache, "_CHUNK_SIZE", 4)
    parallel = build_cache(demo_paths, tmp_path / "parallel", crop=CROP, image_size=SIZE, workers=2)
    np.testing.assert_array_equal(parallel, serial)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("build", [True, False], ids=["build", "check"])
def test_truncated_jpeg_stops_the_build_and_the_check(
    demo_paths: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    build: bool,
) -> None:
    # Small chunks so that with two workers the error comes back from the pool.
    monkeypatch.setattr(image_cache, "_CHUNK_SIZE", 2)
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for source in demo_paths[:6]:
        paths.append(images / source.name)
        paths[-1].write_bytes(source.read_bytes())
    broken = paths[4]
    broken.write_bytes(broken.read_bytes()[:500])
    cache_dir = tmp_path / "cache"
    decode = (
        functools.partial(build_cache, paths, cache_dir)
        if build
        else functools.partial(check_images, paths, progress=False)
    )
    with pytest.raises(CelebAError, match="truncated") as caught:
        decode(crop=CROP, image_size=SIZE, workers=workers)
    assert str(broken) in str(caught.value)
    # Nothing is left that a later run could mistake for a finished cache.
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []
    assert {path.name for path in tmp_path.iterdir()} <= {"images", "cache"}


def test_check_images_passes_whole_images_and_names_missing_ones(
    demo_paths: list[Path], tmp_path: Path
) -> None:
    check_images(demo_paths[:4], crop=CROP, image_size=SIZE, workers=1, progress=False)
    missing = tmp_path / "999999.jpg"
    with pytest.raises(CelebAError, match=f"1 of 3 images are missing, e.g. {missing}"):
        check_images([*demo_paths[:2], missing], crop=CROP, image_size=SIZE, workers=1)
    with pytest.raises(CelebAError, match="at most 178 pixels"):
        check_images(demo_paths[:1], crop=200, image_size=SIZE, workers=1, progress=False)


def test_missing_image_names_the_file(demo_paths: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "999999.jpg"
    with pytest.raises(CelebAError, match=f"1 of 3 images are missing, e.g. {missing}"):
        build_cache([*demo_paths[:2], missing], tmp_path, crop=CROP, image_size=SIZE, workers=1)


def test_replaced_images_get_a_new_cache(demo_paths: list[Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    paths = [images / source.name for source in demo_paths[:3]]
    for path, source in zip(paths, demo_paths[:3], strict=True):
        path.write_bytes(source.read_bytes())
    cache_dir = tmp_path / "cache"
    before = build_cache(paths, cache_dir, crop=CROP, image_size=SIZE, workers=1)
    # As when the demo data is generated again with another seed: same names, new images.
    paths[0].write_bytes(demo_paths[3].read_bytes())
    after = build_cache(paths, cache_dir, crop=CROP, image_size=SIZE, workers=1)
    assert _file_of(after) != _file_of(before)
    reference = build_cache(
        demo_paths[3:4], tmp_path / "reference", crop=CROP, image_size=SIZE, workers=1
    )
    np.testing.assert_array_equal(after[0], reference[0])
    np.testing.assert_array_equal(after[1:], before[1:])


def test_crop_larger_than_the_image(demo_paths: list[Path], tmp_path: Path) -> None:
    with pytest.raises(CelebAError, match="at most 178 pixels"):
        build_cache(demo_paths[:1], tmp_path, crop=200, image_size=SIZE, workers=1)


def test_empty_split(tmp_path: Path) -> None:
    with pytest.raises(CelebAError, match="split is empty"):
        build_cache([], tmp_path, crop=CROP, image_size=SIZE)


# --- DeviceBatches -----------------------------------------------------------------


def _indexed_arrays(n: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Images whose pixels encode their row, and labels [row, row + 0.5]."""
    rows = np.arange(n)
    images = np.broadcast_to((rows % 256).astype(np.uint8)[:, None, None, None], (n, 3, 2, 2))
    labels = np.stack([rows, rows + 0.5], axis=1).astype(np.float32)
    return np.ascontiguousarray(images), labels


def _flat(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


def _epoch_rows(batches: DeviceBatches) -> list[list[int]]:
    rows_per_batch = []
    for images, labels in batches:
        assert images.dtype == torch.uint8
        assert labels.dtype == torch.float32
        rows = labels[:, 0].long()
        torch.testing.assert_close(images[:, 0, 0, 0], (rows % 256).to(torch.uint8))
        torch.testing.assert_close(labels[:, 1], labels[:, 0] + 0.5)
        rows_per_batch.append(rows.tolist())
    return rows_per_batch


@pytest.mark.parametrize("preload", [False, True])
def test_without_shuffle_every_row_once_in_order(preload: bool) -> None:
    images, labels = _indexed_arrays(23)
    batches = DeviceBatches(
        images, labels, batch_size=5, device="cpu", shuffle=False, preload=preload
    )
    rows = _epoch_rows(batches)
    assert len(batches) == len(rows) == 5
    assert [len(batch) for batch in rows] == [5, 5, 5, 5, 3]
    assert _flat(rows) == list(range(23))


def test_drop_last_yields_only_full_batches() -> None:
    images, labels = _indexed_arrays(23)
    batches = DeviceBatches(
        images, labels, batch_size=5, device="cpu", shuffle=True, drop_last=True
    )
    rows = _epoch_rows(batches)
    assert len(batches) == len(rows) == 4
    assert all(len(batch) == 5 for batch in rows)
    assert len(set(_flat(rows))) == 20


def test_shuffle_covers_everything_in_a_new_order_each_epoch() -> None:
    images, labels = _indexed_arrays(64)
    batches = DeviceBatches(images, labels, batch_size=8, device="cpu", shuffle=True, seed=5)
    epochs = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        rows = _epoch_rows(batches)
        assert sorted(_flat(rows)) == list(range(64))
        epochs.append([set(batch) for batch in rows])
    assert epochs[0] != epochs[1] != epochs[2]
    batches.set_epoch(1)
    assert [set(batch) for batch in _epoch_rows(batches)] == epochs[1]
    # Without set_epoch, the next pass moves on to epoch 2.
    assert [set(batch) for batch in _epoch_rows(batches)] == epochs[2]


def test_preloaded_and_host_paths_agree() -> None:
    images, labels = _indexed_arrays(40)
    host = DeviceBatches(images, labels, batch_size=6, device="cpu", shuffle=True, seed=1)
    device = DeviceBatches(
        images, labels, batch_size=6, device="cpu", shuffle=True, seed=1, preload=True
    )
    # The same rows in the same order, so that the per-position flips hit the same images
    # whichever path the free GPU memory picks.
    assert _epoch_rows(host) == _epoch_rows(device)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    world_size=st.integers(1, 5),
    batch_size=st.integers(1, 9),
    epoch=st.integers(0, 3),
    drop_last=st.booleans(),
)
def test_rank_shards_are_disjoint_and_equal(
    n: int, world_size: int, batch_size: int, epoch: int, drop_last: bool
) -> None:
    if n < world_size:
        return
    images, labels = _indexed_arrays(n)
    shards = []
    for rank in range(world_size):
        batches = DeviceBatches(
            images,
            labels,
            batch_size=batch_size,
            device="cpu",
            shuffle=True,
            seed=9,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        batches.set_epoch(epoch)
        rows = _epoch_rows(batches)
        assert len(rows) == len(batches)
        shards.append(_flat(rows))
    shard_size = n // world_size
    expected_batches = shard_size // batch_size if drop_last else math.ceil(shard_size / batch_size)
    assert len(batches) == expected_batches
    every_row = _flat(shards)
    assert len(set(every_row)) == len(every_row)
    expected_rows = shard_size - shard_size % batch_size if drop_last else shard_size
    assert all(len(shard) == expected_rows for shard in shards)


def test_early_exit_releases_the_prefetch_thread() -> None:
    images, labels = _indexed_arrays(50)
    batches = DeviceBatches(images, labels, batch_size=2, device="cpu", shuffle=True, prefetch=3)
    iterator = iter(batches)
    next(iterator)
    assert isinstance(iterator, Generator)
    iterator.close()
    assert not [thread for thread in threading.enumerate() if "DeviceBatches" in thread.name]


@pytest.mark.parametrize(
    ("batch_size", "rank", "world_size", "problem"),
    [(0, 0, 1, "batch_size"), (4, 2, 2, "rank must be"), (4, 0, 11, "cannot be shared")],
)
def test_invalid_batching_arguments(
    batch_size: int, rank: int, world_size: int, problem: str
) -> None:
    images, labels = _indexed_arrays(10)
    with pytest.raises(ValueError, match=problem):
        DeviceBatches(
            images,
            labels,
            batch_size=batch_size,
            device="cpu",
            shuffle=False,
            rank=rank,
            world_size=world_size,
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preload", [False, True])
def test_batches_land_on_cuda(preload: bool) -> None:
    images, labels = _indexed_arrays(30)
    batches = DeviceBatches(
        images, labels, batch_size=8, device="cuda", shuffle=True, preload=preload
    )
    seen = []
    for batch_images, batch_labels in batches:
        assert batch_images.is_cuda
        assert batch_labels.is_cuda
        seen += batch_labels[:, 0].long().tolist()
    assert sorted(seen) == list(range(30))


# --- DataLoader fallback -------------------------------------------------------------


def test_image_folder_dataset_matches_the_cache(demo_paths: list[Path], tmp_path: Path) -> None:
    labels = np.eye(len(demo_paths), 3, dtype=np.float32)
    dataset = ImageFolderDataset(demo_paths, labels, crop=CROP, image_size=SIZE)
    cache = build_cache(demo_paths, tmp_path, crop=CROP, image_size=SIZE, workers=1)
    loader = DataLoader(dataset, batch_size=4, shuffle=False)
    batch_images, batch_labels = next(iter(loader))
    assert len(dataset) == len(demo_paths)
    assert batch_images.dtype == torch.uint8
    assert batch_images.shape == (4, 3, SIZE, SIZE)
    np.testing.assert_array_equal(batch_images.numpy(), cache[:4])
    np.testing.assert_array_equal(batch_labels.numpy(), labels[:4])


# --- prepare_batch ---------------------------------------------------------------------


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _random_images(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, 16, 16), generator=generator, dtype=torch.uint8)


def test_eval_normalises_with_imagenet_statistics() -> None:
    images = _random_images(32)
    prepared = prepare_batch(images, train=False)
    assert prepared.dtype == torch.float32
    assert prepared.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(prepared, (images.float() / 255 - MEAN) / STD)
    # Uniform pixels: mean (0.5 - m) / s and std sqrt(1/12) / s per channel.
    per_channel = prepared.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(
        per_channel.mean(dim=1), (0.5 - MEAN.flatten()) / STD.flatten(), atol=0.05, rtol=0
    )
    torch.testing.assert_close(
        per_channel.std(dim=1), math.sqrt(1 / 12) / STD.flatten(), atol=0.05, rtol=0
    )


def test_channels_last_can_be_turned_off() -> None:
    prepared = prepare_batch(_random_images(2), train=False, channels_last=False)
    assert prepared.is_contiguous()


def test_train_flips_some_images_and_changes_nothing_else() -> None:
    images = _random_images(64)
    original = images.clone()
    generator = torch.Generator().manual_seed(3)
    prepared = prepare_batch(images, train=True, generator=generator)
    plain = prepare_batch(images, train=False)
    mirrored = prepare_batch(images.flip(-1), train=False)
    same = (prepared == plain).flatten(1).all(dim=1)
    flipped = (prepared == mirrored).flatten(1).all(dim=1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54
    torch.testing.assert_close(images, original)
    again = prepare_batch(images, train=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, prepared)


def test_prepare_batch_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="expects uint8"):
        prepare_batch(torch.zeros(1, 3, 4, 4), train=False)
