"""A small synthetic stand-in for CelebA, written in the official on-disk format.

The pictures are cartoon faces whose features depend on the eight
``DEFAULT_ATTRIBUTES``, so a small CNN can learn them at 64 px, while position,
size, colours, noise and JPEG compression keep the task from being trivial.
The other 32 attributes are random and carry no signal in the pictures.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from celeba_files import ATTRIBUTE_NAMES, CelebAError
from celeba_workers import run_chunks
from PIL import Image, ImageDraw

from dstmtl.study._atomic import write_bytes

WIDTH = 178
HEIGHT = 218
# Marks a directory as written by this generator, the only kind it overwrites.
_MARKER = "DEMO_DATA.txt"
# Faces per task in the process pool: enough to amortise its overhead.
_CHUNK_SIZE = 128

# Rough CelebA positive rates, with the make-up and jewellery attributes
# conditioned on sex as they are in the real data (lipstick is ~47% overall).
_P_MALE = 0.42
_P_SMILING = 0.48
_P_YOUNG = 0.77
_P_EYEGLASSES = 0.07
_P_HAT = 0.05
_P_FEMALE_MALE = {
    "Wearing_Lipstick": (0.80, 0.02),
    "Wearing_Earrings": (0.30, 0.03),
    "Wearing_Necklace": (0.20, 0.01),
}

_SKIN_TONES = np.array(
    [(236, 198, 170), (224, 172, 140), (198, 140, 105), (160, 105, 75), (115, 75, 55)],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [(30, 25, 22), (85, 55, 35), (200, 165, 100), (140, 70, 40)], dtype=np.float64
)
_GREY_HAIR = np.array((165, 165, 165), dtype=np.float64)


@dataclass(frozen=True)
class _Cues:
    male: bool
    smiling: bool
    young: bool
    eyeglasses: bool
    hat: bool
    necklace: bool
    earrings: bool
    lipstick: bool


def generate_demo_celeba(
    root: Path,
    n_images: int = 600,
    seed: int = 0,
    valid_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: bool = True,
    workers: int | None = None,
) -> None:
    """Write ``n_images`` synthetic faces and their annotation files under ``root``.

    The partitions are contiguous blocks (train, then valid, then test), as in
    the official files. The annotation files are written last and atomically,
    so an interrupted run never looks like a complete dataset to ``locate``.
    The images are drawn in ``workers`` processes (every usable core by default);
    they depend only on ``seed``, not on ``workers``.
    """
    n_valid = round(n_images * valid_fraction)
    n_test = round(n_images * test_fraction)
    n_train = n_images - n_valid - n_test
    if min(n_train, n_valid, n_test) < 1:
        raise CelebAError(
            f"A demo dataset of {n_images} images with valid fraction {valid_fraction} and "
            f"test fraction {test_fraction} leaves an empty split "
            f"({n_train} train, {n_valid} valid, {n_test} test). Use more images or "
            f"fractions between 0 and 1 whose sum is below 1."
        )
    image_dir = root / "img_align_celeba"
    attributes_file = root / "list_attr_celeba.txt"
    partition_file = root / "list_eval_partition.txt"
    marker = root / _MARKER
    existing = [path for path in (image_dir, attributes_file, partition_file) if path.exists()]
    if existing and not marker.is_file():
        # Without the marker this may be a real CelebA copy; never overwrite it.
        raise CelebAError(
            f"{root} already holds {', '.join(str(path) for path in existing)}, which the demo "
            f"generator did not write. Choose an empty directory for the demo data."
        )
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("Synthetic stand-in for CelebA written by demo_data.py; safe to delete.\n")
    # A dataset from an earlier run must not look complete while its images are
    # being overwritten.
    attributes_file.unlink(missing_ok=True)
    partition_file.unlink(missing_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)

    labels = _sample_labels(n_images, np.random.default_rng(seed))
    column = {name: index for index, name in enumerate(ATTRIBUTE_NAMES)}
    filenames = [f"{index + 1:06d}.jpg" for index in range(n_images)]
    faces = [
        _Cues(
            male=bool(row[column["Male"]]),
            smiling=bool(row[column["Smiling"]]),
            young=bool(row[column["Young"]]),
            eyeglasses=bool(row[column["Eyeglasses"]]),
            hat=bool(row[column["Wearing_Hat"]]),
            necklace=bool(row[column["Wearing_Necklace"]]),
            earrings=bool(row[column["Wearing_Earrings"]]),
            lipstick=bool(row[column["Wearing_Lipstick"]]),
        )
        for row in labels
    ]
    numbered = list(zip(range(n_images), filenames, faces, strict=True))
    chunks = [numbered[start : start + _CHUNK_SIZE] for start in range(0, n_images, _CHUNK_SIZE)]
    run_chunks(
        functools.partial(_draw_faces, str(image_dir), seed),
        chunks,
        total=n_images,
        workers=workers,
        desc="Generating demo CelebA",
        progress=progress,
    )

    partition = [0] * n_train + [1] * n_valid + [2] * n_test
    partition_rows = "".join(
        f"{name} {code}\n" for name, code in zip(filenames, partition, strict=True)
    )
    write_bytes(partition_file, partition_rows.encode())
    signed = np.where(labels, 1, -1)
    rows = (
        f"{name} " + " ".join(f"{value:2d}" for value in signed_row.tolist()) + "\n"
        for name, signed_row in zip(filenames, signed, strict=True)
    )
    # Same shape as the official file: count line, header line with a trailing
    # space, then rows whose -1/1 columns are padded to width two.
    header = f"{n_images}\n" + " ".join(ATTRIBUTE_NAMES) + " \n"
    write_bytes(attributes_file, (header + "".join(rows)).encode())


def _sample_labels(n_images: int, rng: np.random.Generator) -> npt.NDArray[np.bool_]:
    labels = np.empty((n_images, len(ATTRIBUTE_NAMES)), dtype=np.bool_)
    # Attributes without a picture cue get a fixed random prior each, so their
    # base rates differ like the real ones do.
    labels[:] = rng.random(labels.shape) < rng.uniform(0.05, 0.5, size=len(ATTRIBUTE_NAMES))
    column = {name: index for index, name in enumerate(ATTRIBUTE_NAMES)}
    male = rng.random(n_images) < _P_MALE
    labels[:, column["Male"]] = male
    labels[:, column["Smiling"]] = rng.random(n_images) < _P_SMILING
    labels[:, column["Young"]] = rng.random(n_images) < _P_YOUNG
    labels[:, column["Eyeglasses"]] = rng.random(n_images) < _P_EYEGLASSES
    labels[:, column["Wearing_Hat"]] = rng.random(n_images) < _P_HAT
    for name, (p_female, p_male) in _P_FEMALE_MALE.items():
        labels[:, column[name]] = rng.random(n_images) < np.where(male, p_male, p_female)
    return labels


def _draw_faces(image_dir: str, seed: int, faces: list[tuple[int, str, _Cues]]) -> int:
    for index, filename, cues in faces:
        # One generator per image keeps each picture independent of the others,
        # so the output depends only on (seed, index), not on the chunks.
        picture = _draw_face(cues, np.random.default_rng((seed, index)))
        picture.save(Path(image_dir) / filename, format="JPEG", quality=90)
    return len(faces)


def _draw_face(cues: _Cues, rng: np.random.Generator) -> Image.Image:
    background = rng.uniform(40, 220, size=3)
    picture = Image.new("RGB", (WIDTH, HEIGHT), _rgb(background))
    draw = ImageDraw.Draw(picture)

    # Jitter position and size; everything stays inside the centre 178x178
    # crop (rows 20..198) that training uses.
    cx = WIDTH / 2 + rng.uniform(-5, 5)
    cy = 103 + rng.uniform(-5, 5)
    scale = rng.uniform(0.92, 1.06)
    rx, ry = 44 * scale, 56 * scale

    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.uniform(-12, 12, size=3)
    # Young faces are lighter and smooth; older ones darker, often grey-haired
    # and with forehead lines.
    skin = skin + (25 if cues.young else -20)
    if not cues.young and rng.random() < 0.6:
        hair = _GREY_HAIR + rng.uniform(-20, 20)
    else:
        hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] + rng.uniform(-10, 10, size=3)
    clothes = rng.uniform(20, 235, size=3)

    # Neck and shoulders.
    draw.rectangle((cx - 16 * scale, cy + ry - 12, cx + 16 * scale, HEIGHT), fill=_rgb(skin * 0.9))
    draw.ellipse((cx - 80, cy + ry + 22, cx + 80, cy + ry + 120), fill=_rgb(clothes))

    if cues.male:
        # Short hair: only a thin cap shows above the forehead.
        draw.ellipse((cx - rx - 3, cy - ry - 9, cx + rx + 3, cy + 10), fill=_rgb(hair))
    else:
        # Long hair frames the face down to the shoulders.
        draw.ellipse((cx - rx - 14, cy - ry - 12, cx + rx + 14, cy + ry + 32), fill=_rgb(hair))

    for side in (-1, 1):
        ear_x = cx + side * rx
        draw.ellipse((ear_x - 5, cy - 8, ear_x + 5, cy + 12), fill=_rgb(skin * 0.95))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_rgb(skin))

    if cues.male:
        # Stubble: a darker jaw below the nose.
        draw.chord((cx - rx, cy - ry, cx + rx, cy + ry), 20, 160, fill=_rgb(skin * 0.78))
    if not cues.young:
        for offset in (0.55, 0.68):
            y = cy - ry * offset
            draw.arc((cx - rx * 0.5, y - 4, cx + rx * 0.5, y + 6), 200, 340, fill=_rgb(skin * 0.7))

    eye_y = cy - ry * 0.12
    eye_dx = rx * 0.42
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse((ex - 7, eye_y - 4, ex + 7, eye_y + 4), fill=(245, 245, 245))
        draw.ellipse((ex - 3, eye_y - 3, ex + 3, eye_y + 3), fill=(25, 20, 20))
        draw.line((ex - 9, eye_y - 12, ex + 9, eye_y - 12), fill=_rgb(hair * 0.8), width=3)
    draw.line((cx, eye_y + 4, cx - 4, cy + ry * 0.22), fill=_rgb(skin * 0.8), width=2)

    mouth_y = cy + ry * 0.45
    half_mouth = rx * 0.38
    if cues.lipstick:
        lips = np.array((195, 25, 45)) + rng.uniform(-20, 20, size=3)
    else:
        lips = skin * np.array((0.78, 0.58, 0.58))
    if cues.smiling:
        draw.arc(
            (cx - half_mouth, mouth_y - 12, cx + half_mouth, mouth_y + 8),
            15,
            165,
            fill=_rgb(lips),
            width=5,
        )
    else:
        draw.line(
            (cx - half_mouth * 0.8, mouth_y, cx + half_mouth * 0.8, mouth_y),
            fill=_rgb(lips),
            width=5,
        )

    if cues.eyeglasses:
        frame = _rgb(rng.uniform(0, 60, size=3))
        for side in (-1, 1):
            ex = cx + side * eye_dx
            draw.ellipse((ex - 12, eye_y - 10, ex + 12, eye_y + 10), outline=frame, width=3)
            draw.line((ex + side * 12, eye_y, cx + side * rx, eye_y - 2), fill=frame, width=2)
        draw.line((cx - eye_dx + 12, eye_y, cx + eye_dx - 12, eye_y), fill=frame, width=2)

    if cues.hat:
        hat = _rgb(_saturated_colour(rng))
        draw.ellipse((cx - rx + 6, cy - ry - 28, cx + rx - 6, cy - ry + 16), fill=hat)
        draw.rectangle((cx - rx - 8, cy - ry + 2, cx + rx + 8, cy - ry + 16), fill=hat)

    if cues.necklace:
        draw.arc(
            (cx - 17 * scale, cy + ry - 14, cx + 17 * scale, cy + ry + 16),
            20,
            160,
            fill=(250, 215, 70),
            width=3,
        )

    if cues.earrings:
        for side in (-1, 1):
            ear_x = cx + side * (rx + 1)
            draw.ellipse((ear_x - 4, cy + 12, ear_x + 4, cy + 20), fill=(245, 205, 60))

    pixels = np.asarray(picture, dtype=np.float64)
    pixels = pixels * rng.uniform(0.85, 1.15) + rng.normal(0, 7, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _saturated_colour(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    colour = rng.uniform(0, 80, size=3)
    colour[rng.integers(3)] = rng.uniform(180, 255)
    return colour


def _rgb(colour: npt.NDArray[np.float64]) -> tuple[int, int, int]:
    red, green, blue = np.clip(colour, 0, 255).astype(int).tolist()
    return red, green, blue
