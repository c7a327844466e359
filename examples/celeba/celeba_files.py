"""Locate and read the official CelebA annotation files.

Two on-disk layouts are accepted: the official one (``list_attr_celeba.txt``,
``list_eval_partition.txt``, ``img_align_celeba/``), either directly under the
data root or under ``root/celeba`` as torchvision's downloader lays it out,
and the Kaggle re-export (the same tables as CSV files, images usually in
``img_align_celeba/img_align_celeba/``). Only the attribute table, the
partition table and the aligned images are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import numpy as np
import numpy.typing as npt
from arguments import DEFAULT_ATTRIBUTES as DEFAULT_ATTRIBUTES

ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")

Layout = Literal["official", "kaggle"]

_IMAGE_DIR = "img_align_celeba"
_LAYOUT_FILES: tuple[tuple[Layout, str, str], ...] = (
    ("official", "list_attr_celeba.txt", "list_eval_partition.txt"),
    ("kaggle", "list_attr_celeba.csv", "list_eval_partition.csv"),
)
_ACCEPTED_LAYOUTS = (
    "  official: ROOT/img_align_celeba/, ROOT/list_attr_celeba.txt, "
    "ROOT/list_eval_partition.txt (ROOT may also be <data root>/celeba, "
    "as torchvision downloads it)\n"
    "  kaggle:   ROOT/img_align_celeba/img_align_celeba/ (or ROOT/img_align_celeba/), "
    "ROOT/list_attr_celeba.csv, ROOT/list_eval_partition.csv"
)
# Enough examples to recognise a pattern (off-by-one, different release)
# without flooding the terminal with 200k names.
_MAX_EXAMPLES = 5


class CelebAError(Exception):
    """A problem with the user's CelebA data or settings.

    The message says what is wrong and how to fix it, so command-line entry
    points print it and exit without a traceback.
    """


def parse_attributes(spec: str) -> tuple[str, ...]:
    """Turn a comma-separated list of attribute names (or ``all``) into names.

    Matching is case-insensitive; the result uses the official spelling, in
    the order given.
    """
    if spec.strip().lower() == "all":
        return ATTRIBUTE_NAMES
    names = tuple(part.strip() for part in spec.split(","))
    if any(not name for name in names):
        raise CelebAError(
            f"Attribute list {spec!r} contains an empty name. Give attribute names "
            f"separated by single commas, or 'all'."
        )
    return _canonical_attributes(names)


def _canonical_attributes(names: Sequence[str]) -> tuple[str, ...]:
    if not names:
        raise CelebAError("No attributes selected. Give at least one attribute name, or 'all'.")
    by_lower = {name.lower(): name for name in ATTRIBUTE_NAMES}
    unknown = [name for name in names if name.lower() not in by_lower]
    if unknown:
        raise CelebAError(
            f"Unknown CelebA attribute(s): {', '.join(unknown)}. "
            f"Valid names are: {', '.join(ATTRIBUTE_NAMES)}."
        )
    canonical = tuple(by_lower[name.lower()] for name in names)
    duplicates = sorted({name for name in canonical if canonical.count(name) > 1})
    if duplicates:
        raise CelebAError(
            f"Attribute(s) selected more than once: {', '.join(duplicates)}. "
            f"List each attribute once."
        )
    return canonical


@dataclass(frozen=True)
class CelebAFiles:
    """Where the files of one CelebA copy are, as found by :func:`locate`."""

    image_dir: Path
    attributes_file: Path
    partition_file: Path
    layout: Layout


def locate(root: Path) -> CelebAFiles:
    """Find the images and annotation files of CelebA under ``root``."""
    if not root.is_dir():
        raise CelebAError(
            f"CelebA data root {root} does not exist or is not a directory. "
            f"Point the data root at a directory holding CelebA in one of the accepted "
            f"layouts:\n{_ACCEPTED_LAYOUTS}"
        )
    missing_by_candidate: list[str] = []
    for base in (root, root / "celeba"):
        if not base.is_dir():
            continue
        for layout, attributes_name, partition_name in _LAYOUT_FILES:
            image_dir = _image_dir(base)
            attributes_file = base / attributes_name
            partition_file = base / partition_name
            missing = [
                str(path)
                for path, present in (
                    (image_dir, image_dir.is_dir()),
                    (attributes_file, attributes_file.is_file()),
                    (partition_file, partition_file.is_file()),
                )
                if not present
            ]
            if not missing:
                return CelebAFiles(
                    image_dir=image_dir,
                    attributes_file=attributes_file,
                    partition_file=partition_file,
                    layout=layout,
                )
            missing_by_candidate.append(
                f"  {layout} layout in {base}: missing {', '.join(missing)}"
            )
    raise CelebAError(
        f"No complete CelebA copy found under {root}.\n"
        + "\n".join(missing_by_candidate)
        + f"\nAccepted layouts:\n{_ACCEPTED_LAYOUTS}\n"
        "Download the aligned images and the attribute and partition files, or point "
        "the data root at the directory that holds them."
    )


def _image_dir(base: Path) -> Path:
    # The Kaggle archive unpacks to img_align_celeba/img_align_celeba/; use the
    # inner folder when it is there, whatever the annotation format.
    nested = base / _IMAGE_DIR / _IMAGE_DIR
    return nested if nested.is_dir() else base / _IMAGE_DIR


@dataclass(frozen=True, eq=False)
class CelebASplit:
    """One partition: file names and 0/1 labels for the selected attributes.

    ``eq=False`` because comparing the label arrays element-wise has no single
    truth value; compare fields explicitly instead.
    """

    filenames: tuple[str, ...]
    labels: npt.NDArray[np.float32]
    attributes: tuple[str, ...]

    def __post_init__(self) -> None:
        expected = (len(self.filenames), len(self.attributes))
        if self.labels.shape != expected or self.labels.dtype != np.float32:
            raise ValueError(
                f"labels must be float32 with shape {expected} (images x attributes), "
                f"got {self.labels.dtype} with shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.filenames)

    def image_paths(self, image_dir: Path) -> list[Path]:
        return [image_dir / name for name in self.filenames]


def load_splits(files: CelebAFiles, attributes: Sequence[str]) -> dict[str, CelebASplit]:
    """Read both tables and return the ``train``, ``valid`` and ``test`` splits.

    Labels are float32 0/1 (the files use -1/1), one column per requested
    attribute, in the order requested.
    """
    selected = _canonical_attributes(attributes)
    filenames, header, values = _read_attribute_table(files)
    partition = _read_partition_table(files, filenames)
    columns = [header.index(name) for name in selected]
    labels = (values[:, columns] > 0).astype(np.float32)
    splits: dict[str, CelebASplit] = {}
    for code, split_name in enumerate(SPLIT_NAMES):
        rows = np.flatnonzero(partition == code)
        splits[split_name] = CelebASplit(
            filenames=tuple(filenames[row] for row in rows),
            labels=labels[rows],
            attributes=selected,
        )
    return splits


def _read_attribute_table(
    files: CelebAFiles,
) -> tuple[list[str], list[str], npt.NDArray[np.int8]]:
    """Return file names, the attribute names of the columns, and -1/1 labels."""
    path = files.attributes_file
    lines = _read_lines(path)
    if files.layout == "official":
        if len(lines) < 2:
            raise CelebAError(
                f"{path} is too short: it needs the image count on the first line and "
                f"the 40 attribute names on the second. Re-download the file."
            )
        count_line, header_line, rows = lines[0], lines[1], lines[2:]
        header = header_line.split()
        first_row = 3
    else:
        if not lines:
            raise CelebAError(f"{path} is empty. Re-download the file.")
        count_line, rows = "", lines[1:]
        header = [name.strip() for name in lines[0].split(",")][1:]
        first_row = 2
    if sorted(header) != sorted(ATTRIBUTE_NAMES):
        missing = sorted(set(ATTRIBUTE_NAMES) - set(header))
        unexpected = sorted(set(header) - set(ATTRIBUTE_NAMES)) + _repeated(header)
        raise CelebAError(
            f"{path}: the header line does not list the 40 CelebA attributes "
            f"(missing: {', '.join(missing) or 'none'}; unexpected or repeated: "
            f"{', '.join(unexpected) or 'none'}). "
            f"Re-download the file; it may be a different or edited table."
        )
    delimiter = None if files.layout == "official" else ","
    filenames, values = _parse_rows(path, rows, first_row, delimiter, len(ATTRIBUTE_NAMES))
    if files.layout == "official":
        _check_count_line(path, count_line, len(filenames))
    bad = np.flatnonzero(~np.isin(values, (-1, 1)).all(axis=1))
    if bad.size:
        raise CelebAError(
            f"{path} line {first_row + bad[0]} ({filenames[bad[0]]}): labels must be -1 or 1, "
            f"got {values[bad[0]].tolist()}. Re-download the file."
        )
    repeated = _repeated(filenames)
    if repeated:
        raise CelebAError(
            f"{path} lists some images more than once (e.g. {', '.join(repeated)}). "
            f"Re-download the file."
        )
    return filenames, header, values


def _read_partition_table(files: CelebAFiles, filenames: list[str]) -> npt.NDArray[np.int8]:
    """Return the partition code (0 train, 1 valid, 2 test) of each listed image."""
    path = files.partition_file
    lines = _read_lines(path)
    if files.layout == "official":
        rows, first_row, delimiter = lines, 1, None
    else:
        rows, first_row, delimiter = lines[1:], 2, ","
    names, values = _parse_rows(path, rows, first_row, delimiter, 1)
    codes = values[:, 0]
    bad = np.flatnonzero(~np.isin(codes, (0, 1, 2)))
    if bad.size:
        raise CelebAError(
            f"{path} line {first_row + bad[0]} ({names[bad[0]]}): partition must be "
            f"0 (train), 1 (valid) or 2 (test), got {codes[bad[0]]}. Re-download the file."
        )
    if names == filenames:
        return codes
    # Same images in another order is harmless; anything else means the two
    # files come from different releases or one of them was edited.
    code_by_name = dict(zip(names, codes.tolist(), strict=True))
    only_attributes = [name for name in filenames if name not in code_by_name]
    listed = set(filenames)
    only_partition = [name for name in names if name not in listed]
    if only_attributes or only_partition or len(names) != len(filenames):
        raise CelebAError(
            f"{path} does not list the same images as {files.attributes_file}: "
            f"{len(filenames)} images in the attribute file, {len(names)} in the partition "
            f"file; {len(only_attributes)} only in the attribute file "
            f"(e.g. {', '.join(only_attributes[:_MAX_EXAMPLES]) or 'none'}), "
            f"{len(only_partition)} only in the partition file "
            f"(e.g. {', '.join(only_partition[:_MAX_EXAMPLES]) or 'none'}). "
            f"Use the attribute and partition files of the same CelebA download."
        )
    return np.array([code_by_name[name] for name in filenames], dtype=np.int8)


def _read_lines(path: Path) -> list[str]:
    try:
        # utf-8-sig drops the byte-order mark some CSV exports start with.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CelebAError(
            f"Cannot read {path}: {error}. Check the file and its permissions."
        ) from error
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _parse_rows(
    path: Path,
    rows: list[str],
    first_row: int,
    delimiter: str | None,
    n_values: int,
) -> tuple[list[str], npt.NDArray[np.int8]]:
    """Split ``name v1 v2 ...`` rows into names and an int8 value matrix.

    The values go through ``np.loadtxt`` because a Python loop over the 8
    million labels of the real file takes seconds; the slow per-row scan only
    runs to explain an error.
    """
    if not rows:
        raise CelebAError(f"{path} has no image rows. Re-download the file.")
    names: list[str] = []
    rests: list[str] = []
    for index, row in enumerate(rows):
        parts = row.split(delimiter, 1)
        if len(parts) != 2:
            _raise_bad_row(path, first_row + index, row, n_values)
        names.append(parts[0].strip())
        rests.append(parts[1])
    try:
        values = np.loadtxt(rests, dtype=np.int8, delimiter=delimiter, ndmin=2)
    except ValueError:
        values = np.empty((0, 0), dtype=np.int8)
    if values.shape != (len(rows), n_values):
        for index, rest in enumerate(rests):
            fields = rest.split(delimiter)
            if len(fields) != n_values or not all(_is_int(field) for field in fields):
                _raise_bad_row(path, first_row + index, rows[index], n_values)
        raise CelebAError(f"{path} could not be parsed. Re-download the file.")
    return names, values


def _raise_bad_row(path: Path, line_number: int, row: str, n_values: int) -> NoReturn:
    shown = row if len(row) <= 80 else row[:77] + "..."
    raise CelebAError(
        f"{path} line {line_number}: expected an image name followed by {n_values} "
        f"integer value(s), got {shown!r}. The file looks truncated or edited; "
        f"re-download it."
    )


def _is_int(field: str) -> bool:
    try:
        int(field)
    except ValueError:
        return False
    return True


def _check_count_line(path: Path, count_line: str, n_rows: int) -> None:
    try:
        count = int(count_line.strip())
    except ValueError:
        raise CelebAError(
            f"{path}: the first line should be the number of images, got {count_line!r}. "
            f"Re-download the file."
        ) from None
    if count != n_rows:
        raise CelebAError(
            f"{path} announces {count} images on its first line but has {n_rows} rows. "
            f"The file is truncated or edited; re-download it."
        )


def _repeated(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for name in names:
        if name in seen and len(repeated) < _MAX_EXAMPLES:
            repeated.append(name)
        seen.add(name)
    return repeated
