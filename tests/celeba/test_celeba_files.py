"""Tests for locating and reading the CelebA annotation files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from celeba_files import (
    ATTRIBUTE_NAMES,
    DEFAULT_ATTRIBUTES,
    CelebAError,
    CelebAFiles,
    load_splits,
    locate,
    parse_attributes,
)
from hypothesis import given
from hypothesis import strategies as st

N_IMAGES = 40
# Contiguous blocks like the real partition file: 28 train, 6 valid, 6 test.
PARTITION = np.array([0] * 28 + [1] * 6 + [2] * 6, dtype=np.int8)
FILENAMES = [f"{index + 1:06d}.jpg" for index in range(N_IMAGES)]


@pytest.fixture
def signed_labels() -> npt.NDArray[np.int8]:
    rng = np.random.default_rng(1)
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(N_IMAGES, len(ATTRIBUTE_NAMES)))


def write_official(
    base: Path,
    labels: npt.NDArray[np.int8],
    *,
    filenames: list[str] = FILENAMES,
    partition: npt.NDArray[np.int8] = PARTITION,
) -> None:
    """Write the official text format, with its count line and padded columns."""
    (base / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f"{name} " + " ".join(f"{value:2d}" for value in row.tolist()) + "\n"
        for name, row in zip(filenames, labels, strict=True)
    )
    header = f"{len(filenames)}\n{' '.join(ATTRIBUTE_NAMES)} \n"
    (base / "list_attr_celeba.txt").write_text(header + rows)
    (base / "list_eval_partition.txt").write_text(
        "".join(
            f"{name} {code}\n" for name, code in zip(filenames, partition.tolist(), strict=True)
        )
    )


def write_kaggle(base: Path, labels: npt.NDArray[np.int8], *, nested: bool) -> None:
    image_dir = base / "img_align_celeba"
    (image_dir / "img_align_celeba" if nested else image_dir).mkdir(parents=True)
    rows = "".join(
        f"{name}," + ",".join(str(value) for value in row.tolist()) + "\n"
        for name, row in zip(FILENAMES, labels, strict=True)
    )
    (base / "list_attr_celeba.csv").write_text(
        "image_id," + ",".join(ATTRIBUTE_NAMES) + "\n" + rows
    )
    (base / "list_eval_partition.csv").write_text(
        "image_id,partition\n"
        + "".join(
            f"{name},{code}\n" for name, code in zip(FILENAMES, PARTITION.tolist(), strict=True)
        )
    )


def check_splits(files: CelebAFiles, signed: npt.NDArray[np.int8]) -> None:
    requested = ("Young", "5_o_Clock_Shadow", "Male")
    splits = load_splits(files, requested)
    assert list(splits) == ["train", "valid", "test"]
    columns = [ATTRIBUTE_NAMES.index(name) for name in requested]
    expected_01 = (signed[:, columns] == 1).astype(np.float32)
    for code, split in enumerate(splits.values()):
        rows = np.flatnonzero(np.equal(PARTITION, code))
        assert split.filenames == tuple(FILENAMES[row] for row in rows)
        assert split.attributes == requested
        assert split.labels.dtype == np.float32
        np.testing.assert_array_equal(split.labels, expected_01[rows])
    assert [len(split) for split in splits.values()] == [28, 6, 6]


# --- attribute selection ----------------------------------------------------


def test_parse_attributes_all_and_whitespace() -> None:
    assert parse_attributes("all") == ATTRIBUTE_NAMES
    assert parse_attributes(" ALL ") == ATTRIBUTE_NAMES
    assert parse_attributes(" male ,Smiling,  Wearing_Hat ") == ("Male", "Smiling", "Wearing_Hat")
    assert parse_attributes(",".join(DEFAULT_ATTRIBUTES)) == DEFAULT_ATTRIBUTES


@given(st.lists(st.sampled_from(ATTRIBUTE_NAMES), unique=True, min_size=1))
def test_parse_attributes_keeps_the_requested_order(names: list[str]) -> None:
    assert parse_attributes(" , ".join(names)) == tuple(names)


def test_unknown_attribute_lists_the_valid_names() -> None:
    with pytest.raises(CelebAError, match="Unknown CelebA attribute") as caught:
        parse_attributes("Male,Beard,Hat")
    message = str(caught.value)
    assert "Beard, Hat" in message
    assert all(name in message for name in ATTRIBUTE_NAMES)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [("Male,Smiling,male", "more than once"), ("", "empty name"), ("Male,,Young", "empty name")],
)
def test_bad_attribute_lists(spec: str, problem: str) -> None:
    with pytest.raises(CelebAError, match=problem):
        parse_attributes(spec)


def test_load_splits_rejects_unknown_and_empty_attributes(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    write_official(tmp_path, signed_labels)
    files = locate(tmp_path)
    with pytest.raises(CelebAError, match="Valid names are"):
        load_splits(files, ["Smiling", "Sunglasses"])
    with pytest.raises(CelebAError, match="No attributes selected"):
        load_splits(files, [])


# --- layouts ------------------------------------------------------------------


def test_official_layout_at_root(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    write_official(tmp_path, signed_labels)
    files = locate(tmp_path)
    assert files == CelebAFiles(
        image_dir=tmp_path / "img_align_celeba",
        attributes_file=tmp_path / "list_attr_celeba.txt",
        partition_file=tmp_path / "list_eval_partition.txt",
        layout="official",
    )
    # The written file has the quirks the reader must cope with.
    text = files.attributes_file.read_text().splitlines()
    assert text[0] == str(N_IMAGES)
    assert text[1].split() == list(ATTRIBUTE_NAMES)
    assert re.search(r"\.jpg -?1 {1,2}-?1", text[2])
    assert "  1" in "".join(text[2:])
    check_splits(files, signed_labels)


def test_official_layout_under_celeba_subdirectory(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    write_official(tmp_path / "celeba", signed_labels)
    files = locate(tmp_path)
    assert files.layout == "official"
    assert files.image_dir == tmp_path / "celeba" / "img_align_celeba"
    check_splits(files, signed_labels)


@pytest.mark.parametrize("nested", [True, False])
def test_kaggle_layout(tmp_path: Path, signed_labels: npt.NDArray[np.int8], nested: bool) -> None:
    write_kaggle(tmp_path, signed_labels, nested=nested)
    files = locate(tmp_path)
    assert files.layout == "kaggle"
    expected_dir = tmp_path / "img_align_celeba"
    assert files.image_dir == (expected_dir / "img_align_celeba" if nested else expected_dir)
    assert files.attributes_file.suffix == ".csv"
    check_splits(files, signed_labels)


def test_kaggle_csv_with_byte_order_mark(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    write_kaggle(tmp_path, signed_labels, nested=True)
    for name in ("list_attr_celeba.csv", "list_eval_partition.csv"):
        path = tmp_path / name
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    check_splits(locate(tmp_path), signed_labels)


def test_partition_rows_in_another_order(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    write_official(tmp_path, signed_labels)
    partition_file = tmp_path / "list_eval_partition.txt"
    partition_file.write_text("".join(reversed(partition_file.read_text().splitlines(True))))
    check_splits(locate(tmp_path), signed_labels)


def test_image_paths(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    write_official(tmp_path, signed_labels)
    files = locate(tmp_path)
    test_split = load_splits(files, DEFAULT_ATTRIBUTES)["test"]
    assert test_split.image_paths(files.image_dir) == [
        files.image_dir / name for name in FILENAMES[34:]
    ]


# --- bad input -----------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(CelebAError, match="does not exist") as caught:
        locate(root)
    assert str(root) in str(caught.value)
    assert "list_attr_celeba.txt" in str(caught.value)


@pytest.mark.parametrize("missing", ["list_attr_celeba.txt", "list_eval_partition.txt"])
def test_missing_annotation_file(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8], missing: str
) -> None:
    write_official(tmp_path, signed_labels)
    (tmp_path / missing).unlink()
    with pytest.raises(CelebAError) as caught:
        locate(tmp_path)
    message = str(caught.value)
    assert f"missing {tmp_path / missing}" in message
    assert str(tmp_path) in message
    assert "official:" in message
    assert "kaggle:" in message
    assert "img_align_celeba/img_align_celeba/" in message


def test_missing_image_directory(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    write_official(tmp_path, signed_labels)
    (tmp_path / "img_align_celeba").rmdir()
    with pytest.raises(CelebAError, match=re.escape(f"missing {tmp_path / 'img_align_celeba'}")):
        locate(tmp_path)


def test_truncated_attribute_file(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    write_official(tmp_path, signed_labels)
    attributes_file = tmp_path / "list_attr_celeba.txt"
    # Whole rows cut off at the end: the count line still announces all of them.
    attributes_file.write_text("".join(attributes_file.read_text().splitlines(True)[:-5]))
    with pytest.raises(CelebAError, match=r"announces 40 images .* has 35 rows"):
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)


def test_attribute_file_cut_mid_row(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    write_official(tmp_path, signed_labels)
    attributes_file = tmp_path / "list_attr_celeba.txt"
    attributes_file.write_text(attributes_file.read_text()[:-30])
    with pytest.raises(CelebAError, match=r"line 42: expected an image name followed by 40"):
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)


def test_label_outside_minus_one_one(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    labels = signed_labels.copy()
    labels[5, 7] = 0
    write_official(tmp_path, labels)
    with pytest.raises(CelebAError, match=r"line 8 \(000006\.jpg\): labels must be -1 or 1"):
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)


def test_header_without_all_attributes(tmp_path: Path, signed_labels: npt.NDArray[np.int8]) -> None:
    write_official(tmp_path, signed_labels)
    attributes_file = tmp_path / "list_attr_celeba.txt"
    attributes_file.write_text(attributes_file.read_text().replace("Eyeglasses", "Glasses", 1))
    with pytest.raises(CelebAError, match="missing: Eyeglasses; unexpected or repeated: Glasses"):
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)


def test_partition_file_for_other_images(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    write_official(tmp_path, signed_labels)
    others = [*FILENAMES[:38], "900001.jpg", "900002.jpg", "900003.jpg"]
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{name} 0\n" for name in others))
    with pytest.raises(CelebAError) as caught:
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)
    message = str(caught.value)
    assert "does not list the same images" in message
    assert "40 images in the attribute file, 41 in the partition file" in message
    assert "2 only in the attribute file (e.g. 000039.jpg, 000040.jpg)" in message
    assert "3 only in the partition file (e.g. 900001.jpg" in message


def test_partition_value_outside_zero_to_two(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    partition = PARTITION.copy()
    partition[3] = 3
    write_official(tmp_path, signed_labels, partition=partition)
    with pytest.raises(CelebAError, match=r"line 4 \(000004\.jpg\): partition must be 0"):
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)


def test_repeated_image_in_attribute_file(
    tmp_path: Path, signed_labels: npt.NDArray[np.int8]
) -> None:
    write_official(tmp_path, signed_labels, filenames=[*FILENAMES[:39], FILENAMES[0]])
    with pytest.raises(CelebAError, match=r"more than once \(e\.g\. 000001\.jpg\)"):
        load_splits(locate(tmp_path), DEFAULT_ATTRIBUTES)
