"""Tests for the synthetic stand-in dataset."""

from __future__ import annotations

from pathlib import Path

import demo_data
import numpy as np
import numpy.typing as npt
import pytest
from celeba_files import ATTRIBUTE_NAMES, DEFAULT_ATTRIBUTES, CelebAError, load_splits, locate
from demo_data import generate_demo_celeba
from PIL import Image


def _pixels(image_dir: Path, names: tuple[str, ...]) -> npt.NDArray[np.float64]:
    """All images of a split as float [N, H, W, 3]."""
    return np.stack([np.asarray(Image.open(image_dir / name), dtype=np.float64) for name in names])


def test_official_format_readable_by_the_reader(demo_root: Path) -> None:
    files = locate(demo_root)
    assert files.layout == "official"
    splits = load_splits(files, ATTRIBUTE_NAMES)
    assert [len(split) for split in splits.values()] == [84, 18, 18]
    assert splits["train"].filenames[0] == "000001.jpg"
    assert splits["test"].filenames[-1] == "000120.jpg"

    lines = files.attributes_file.read_text().splitlines()
    assert lines[0] == "120"
    assert lines[1] == " ".join(ATTRIBUTE_NAMES) + " "
    assert all(len(line.split()) == 41 for line in lines[2:])
    assert "  1" in lines[2] or "  1" in lines[3]
    assert files.partition_file.read_text().splitlines()[0] == "000001.jpg 0"


def test_images_are_178_by_218_jpegs(demo_root: Path) -> None:
    image_dir = demo_root / "img_align_celeba"
    names = sorted(path.name for path in image_dir.iterdir())
    assert names == [f"{index:06d}.jpg" for index in range(1, 121)]
    with Image.open(image_dir / names[0]) as image:
        assert image.format == "JPEG"
        assert image.size == (178, 218)
        assert image.mode == "RGB"


def test_label_rates_resemble_celeba(demo_root: Path) -> None:
    labels = np.concatenate(
        [split.labels for split in load_splits(locate(demo_root), DEFAULT_ATTRIBUTES).values()]
    )
    rates = dict(zip(DEFAULT_ATTRIBUTES, labels.mean(axis=0).tolist(), strict=True))
    assert 0.25 < rates["Male"] < 0.6
    assert rates["Young"] > 0.6
    assert rates["Wearing_Hat"] < 0.15
    assert rates["Eyeglasses"] < 0.15


def test_same_seed_same_bytes_other_seed_other_pictures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # b is drawn by two processes, several chunks each: the bytes must not depend on that.
    monkeypatch.setattr(demo_data, "_CHUNK_SIZE", 3)
    for name, seed, workers in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        generate_demo_celeba(tmp_path / name, n_images=10, seed=seed, workers=workers)
    written = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*.*"))
    assert len(written) == 13
    for relative in written:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    for relative in (Path("list_attr_celeba.txt"), Path("img_align_celeba/000001.jpg")):
        assert (tmp_path / "a" / relative).read_bytes() != (tmp_path / "c" / relative).read_bytes()


def _groups(
    demo_root: Path, attribute: str, rows: slice, columns: slice
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean RGB of a picture region for the images with and without ``attribute``."""
    files = locate(demo_root)
    split = load_splits(files, [attribute])["train"]
    region = _pixels(files.image_dir, split.filenames)[:, rows, columns].mean(axis=(1, 2))
    positive = split.labels[:, 0] == 1
    assert 0 < positive.sum() < len(split), "both groups must be present"
    return region[positive], region[~positive]


def test_lipstick_makes_the_mouth_red(demo_root: Path) -> None:
    # Mouth region in full-image coordinates (rows ~117..140, centred columns).
    positive, negative = _groups(demo_root, "Wearing_Lipstick", slice(115, 142), slice(72, 106))

    def redness(rgb: npt.NDArray[np.float64]) -> float:
        return float((rgb[:, 0] - (rgb[:, 1] + rgb[:, 2]) / 2).mean())

    assert redness(positive) > redness(negative) + 5


def test_young_faces_are_lighter(demo_root: Path) -> None:
    positive, negative = _groups(demo_root, "Young", slice(66, 77), slice(80, 98))
    assert positive.mean() > negative.mean() + 15


def test_glasses_add_dark_frames_around_the_eyes(demo_root: Path) -> None:
    files = locate(demo_root)
    split = load_splits(files, ["Eyeglasses"])["train"]
    eye_band = _pixels(files.image_dir, split.filenames)[:, 86:111, 52:127]
    dark_fraction = (eye_band.max(axis=-1) < 80).mean(axis=(1, 2))
    positive = split.labels[:, 0] == 1
    assert positive.any()
    assert dark_fraction[positive].mean() > dark_fraction[~positive].mean() + 0.1


def test_hat_puts_a_coloured_band_on_top(demo_root: Path) -> None:
    positive, negative = _groups(demo_root, "Wearing_Hat", slice(50, 60), slice(60, 118))

    def saturation(rgb: npt.NDArray[np.float64]) -> float:
        return float((rgb.max(axis=1) - rgb.min(axis=1)).mean())

    assert saturation(positive) > saturation(negative) + 30


@pytest.mark.parametrize(
    ("n_images", "valid_fraction", "test_fraction"),
    [(2, 0.15, 0.15), (100, 0.5, 0.5), (100, 0.0, 0.2)],
)
def test_bad_sizes_are_rejected(
    tmp_path: Path, n_images: int, valid_fraction: float, test_fraction: float
) -> None:
    with pytest.raises(CelebAError, match="leaves an empty split"):
        generate_demo_celeba(
            tmp_path,
            n_images=n_images,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
        )


def test_interrupted_generation_does_not_look_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_demo_celeba(tmp_path, n_images=10)
    locate(tmp_path)
    original = demo_data._draw_face
    calls = 0

    def draw_then_fail(cues: demo_data._Cues, rng: np.random.Generator) -> Image.Image:
        nonlocal calls
        calls += 1
        if calls > 4:
            raise KeyboardInterrupt
        return original(cues, rng)

    monkeypatch.setattr(demo_data, "_draw_face", draw_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_celeba(tmp_path, n_images=10, seed=1)
    with pytest.raises(CelebAError, match=r"list_attr_celeba\.txt"):
        locate(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))


def test_refuses_to_overwrite_data_it_did_not_write(tmp_path: Path) -> None:
    real = tmp_path / "list_attr_celeba.txt"
    real.write_text("202599\n")
    with pytest.raises(CelebAError, match="did not write"):
        generate_demo_celeba(tmp_path, n_images=10)
    assert real.read_text() == "202599\n"
    assert not (tmp_path / "img_align_celeba").exists()
