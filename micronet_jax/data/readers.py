"""Reading gland-segmentation datasets from disk into :class:`Example` records.

Everything downstream (the grain pipeline, evaluation, the TFDS builder) consumes a plain list of
``Example``: an RGB ``uint8`` image and an ``int32`` instance-label map. Keeping the on-disk formats
(BMP/PNG/TIFF/JPEG, palette or 16-bit files, the GlaS flat layout, a generic images/masks folder)
confined to this module means the rest of the package never has to guess what a file held.

Every failure caused by the user's files raises :class:`DataError` with a message naming the file or
folder, because "cannot identify image file" from deep inside a data loader is useless when a dataset
has 165 files in it.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "Example",
    "GLAS_SPLITS",
    "IMAGE_EXTENSIONS",
    "read_image",
    "read_label",
    "load_pair",
    "load_glas",
    "load_folder",
    "split_train_val",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Lossless formats first: when a folder holds the same image twice (e.g. the official BMP and a PNG
# copy), the first extension in this order wins, so a lossy JPEG is only used when it is all there is.
IMAGE_EXTENSIONS: tuple[str, ...] = (".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg")
_LOSSY_EXTENSIONS = frozenset({".jpg", ".jpeg"})

GLAS_SPLITS: tuple[str, ...] = ("train", "testA", "testB")
_GLAS_FILE = re.compile(r"^(train|testA|testB)_(\d+)(_anno)?$")


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent.

    A ``ValueError`` subclass so callers that already catch ``ValueError`` keep working, while the
    command line can catch exactly this and print the message (which names the file) without a traceback.
    """


@dataclasses.dataclass(frozen=True)
class Example:
    """One annotated image.

    Attributes:
      name: Identifier, the file stem for on-disk datasets (``train_12``); unique within a dataset.
      image: ``uint8`` array of shape ``(H, W, 3)``, RGB.
      label: ``int32`` array of shape ``(H, W)``: 0 is background, 1..K one id per object (gland).
      grade: GlaS grade (``benign`` / ``malignant``) when known, used only for reporting.
      patient: Patient ID when known; ``split_train_val(by="patient")`` needs it.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    grade: str | None = None
    patient: str | None = None


# ----------------------------------------------------------------------------------------- files


def _open(path: Path) -> Image.Image:
    """Opens and fully decodes ``path`` so truncated files fail here, not later in a worker."""
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a file: {path}")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError for truncated data, SyntaxError/ValueError from some broken headers.
        raise DataError(f"cannot decode image file {path}: {e}") from e
    return img


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    """Maps 0..65535 onto 0..255 (x / 257, rounded) so full-range white stays 255."""
    return np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def read_image(path: PathLike) -> np.ndarray:
    """Reads an image file as RGB ``uint8`` of shape ``(H, W, 3)``.

    H&E images are RGB; anything else (grayscale, alpha, palette, CMYK, 16-bit) is converted, with a
    warning for colour-model changes, because such a file in an H&E dataset is usually a mistake the
    user wants to hear about even though training can proceed.

    Raises:
      DataError: the file is missing or cannot be decoded, or has a pixel format that has no
        sensible RGB reading (floating point).
    """
    path = Path(path)
    img = _open(path)
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale, e.g. a microscope export: scale to 8 bits.
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"image {path} has integer values outside 0..65535 (mode {mode})")
        if mode == "I" and a.size and a.max() <= 255:
            gray = a.astype(np.uint8)  # 8-bit data stored in a 32-bit container.
        else:
            gray = _scale_16bit(a)
        logger.warning("image %s is %s grayscale: scaled to 8 bits and replicated to RGB", path, mode)
        arr = np.repeat(gray[..., None], 3, axis=-1)
    elif mode == "F":
        raise DataError(f"image {path} has floating-point pixels (mode F); expected 8- or 16-bit RGB")
    else:
        if mode in ("L", "1"):
            what = "grayscale: replicated to RGB"
        elif mode in ("RGBA", "LA", "RGBa", "La", "PA"):
            what = "has an alpha channel: alpha dropped"
        elif mode == "P":
            what = "is a palette image: converted to RGB"
        else:
            what = f"is {mode}: converted to RGB"
        logger.warning("image %s %s", path, what)
        # convert("RGB") drops alpha without compositing, which is what we want: the colour under
        # a transparent pixel is the stain colour, not a blend with an arbitrary background.
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim != 3 or arr.shape[-1] != 3:  # pragma: no cover - PIL guarantees this for RGB.
        raise DataError(f"image {path} decoded to shape {arr.shape}, expected (H, W, 3)")
    if arr.dtype != np.uint8:
        raise DataError(f"image {path} decoded to dtype {arr.dtype}, expected uint8")
    return np.ascontiguousarray(arr)


def read_label(path: PathLike) -> np.ndarray:
    """Reads an instance-label mask as ``int32`` of shape ``(H, W)``.

    Accepts 1-bit, 8-bit (grayscale or palette; the palette *index* is the label, which is how
    indexed annotation tools store ids), 16-bit and 32-bit integer files. A 3-channel file is
    accepted only if its channels are equal, because some tools save grayscale masks as RGB; a
    colour-coded mask would need a colour->id table we do not have, so it is an error.

    Raises:
      DataError: missing/undecodable file, multi-channel with differing channels, float values, or
        negative ids.
    """
    path = Path(path)
    img = _open(path)
    mode = img.mode
    if path.suffix.lower() in _LOSSY_EXTENSIONS:
        logger.warning("label %s is JPEG: lossy compression may have changed label ids", path)
    if mode == "F":
        raise DataError(
            f"label {path} has floating-point values: mask must be single-channel integer labels"
        )
    if mode in ("1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
    elif mode in ("RGB", "RGBA", "LA"):
        a = np.asarray(img)
        if mode == "LA":
            arr = a[..., 0]
        else:
            rgb = a[..., :3]
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise DataError(
                    f"label {path} has {mode} channels that differ: mask must be single-channel "
                    "integer labels (0 = background, 1..K = object ids)"
                )
            arr = rgb[..., 0]
    else:
        raise DataError(f"label {path} has pixel mode {mode}: mask must be single-channel integer labels")
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):  # pragma: no cover - modes above are integer.
        raise DataError(f"label {path} has dtype {arr.dtype}: mask must be single-channel integer labels")
    if arr.size and arr.min() < 0:
        raise DataError(f"label {path} has negative values: mask must use 0 = background, 1..K = ids")
    return np.ascontiguousarray(arr.astype(np.int32))


def load_pair(
    image_path: PathLike,
    label_path: PathLike,
    name: str,
    grade: str | None = None,
    patient: str | None = None,
) -> Example:
    """Reads an image and its mask and checks they have the same size.

    Raises:
      DataError: either file fails to read, or the sizes differ (message names both files and sizes).
    """
    image = read_image(image_path)
    label = read_label(label_path)
    if image.shape[:2] != label.shape:
        ih, iw = image.shape[:2]
        lh, lw = label.shape
        raise DataError(
            f"image and mask sizes differ: {image_path} is {iw}x{ih} (WxH) but {label_path} is {lw}x{lh}"
        )
    return Example(name=name, image=image, label=label, grade=grade, patient=patient)


# ------------------------------------------------------------------------------------ folders


def _natural_key(s: str) -> list[int | str]:
    """Sort key that orders ``train_2`` before ``train_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _pick_file(paths: Sequence[Path]) -> Path:
    """Chooses among files with the same stem: the most lossless extension (IMAGE_EXTENSIONS order)."""
    return min(paths, key=lambda p: (IMAGE_EXTENSIONS.index(p.suffix.lower()), p.name))


def _index_by_stem(folder: Path) -> dict[str, Path]:
    """Maps file stem -> chosen file for every image-like file in ``folder`` (hidden files ignored)."""
    groups: dict[str, list[Path]] = {}
    for p in folder.iterdir():
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        groups.setdefault(p.stem, []).append(p)
    return {stem: _pick_file(ps) for stem, ps in groups.items()}


def _require_dir(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} not found: {root}")
    if not root.is_dir():
        raise DataError(f"{what} is not a folder: {root}")


def _norm_header(h: str) -> str:
    return " ".join(h.strip().lower().split())


def _read_grades(csv_path: Path) -> dict[str, tuple[str | None, str | None]]:
    """Parses GlaS ``Grade.csv`` into ``name -> (glas_grade, patient_id)``.

    The official header is ``name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)``
    with leading spaces in headers and values, so columns are found by normalised name (falling
    back to the official column order) and every cell is stripped.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read grade table {csv_path}: {e}") from e
    if not rows:
        return {}
    header = [_norm_header(h) for h in rows[0]]

    def find(pred, default: int | None) -> int | None:
        for i, h in enumerate(header):
            if pred(h):
                return i
        return default

    i_name = find(lambda h: h in ("name", "image", "image name", "filename"), None)
    if i_name is None:
        raise DataError(f"grade table {csv_path} has no 'name' column (header: {rows[0]})")
    i_patient = find(lambda h: "patient" in h, None)
    i_grade = find(lambda h: "grade" in h and "glas" in h, None)
    if i_grade is None:
        i_grade = find(lambda h: h == "grade" or h.startswith("grade"), None)
    grades: dict[str, tuple[str | None, str | None]] = {}
    for r in rows[1:]:
        cells = [c.strip() for c in r]

        def cell(i: int | None) -> str | None:
            if i is None or i >= len(cells) or not cells[i]:
                return None
            return cells[i]

        name = cell(i_name)
        if name is None:
            continue
        name = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
        grade = cell(i_grade)
        grades[name] = (grade.lower() if grade else None, cell(i_patient))
    return grades


def load_glas(root: PathLike, split: str) -> list[Example]:
    """Loads one split of GlaS from the official flat folder.

    Layout: ``train_N`` / ``testA_N`` / ``testB_N`` images next to ``<name>_anno`` masks, any of
    :data:`IMAGE_EXTENSIONS` (the official release is BMP; lossless wins when several exist), plus an
    optional ``Grade.csv`` that supplies ``grade`` and ``patient``. Examples come back sorted by N.

    Raises:
      DataError: missing root, unknown split, no image of the split, an image without its mask, or
        any unreadable file.
    """
    if split not in GLAS_SPLITS:
        raise DataError(f"unknown GlaS split {split!r}; expected one of {', '.join(GLAS_SPLITS)}")
    root = Path(root)
    _require_dir(root, "GlaS folder")
    images: dict[int, Path] = {}
    annos: dict[int, Path] = {}
    for stem, path in _index_by_stem(root).items():
        m = _GLAS_FILE.match(stem)
        if m is None or m.group(1) != split:
            continue
        (annos if m.group(3) else images)[int(m.group(2))] = path
    if not images:
        raise DataError(f"no {split}_* images in {root}")
    missing = [images[n] for n in sorted(images) if n not in annos]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} image(s) without a {split}_N_anno mask in {root}: {shown}")
    csv_path = root / "Grade.csv"
    grades = _read_grades(csv_path) if csv_path.is_file() else {}
    out = []
    for n in sorted(images):
        name = f"{split}_{n}"
        grade, patient = grades.get(name, (None, None))
        out.append(load_pair(images[n], annos[n], name, grade=grade, patient=patient))
    return out


def load_folder(root: PathLike) -> list[Example]:
    """Loads a generic dataset laid out as ``root/images/<stem>.*`` and ``root/masks/<stem>.*``.

    Masks are matched to images by file stem, so ``images/a.jpg`` pairs with ``masks/a.png``. Masks
    without an image are ignored (with a warning) since they cannot be trained on; images without a
    mask are an error, since silently dropping them changes the dataset.

    Raises:
      DataError: missing folders, no images, images without masks, or unreadable files.
    """
    root = Path(root)
    _require_dir(root, "dataset folder")
    img_dir, mask_dir = root / "images", root / "masks"
    _require_dir(img_dir, "images folder")
    _require_dir(mask_dir, "masks folder")
    images = _index_by_stem(img_dir)
    masks = _index_by_stem(mask_dir)
    if not images:
        raise DataError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in {img_dir}")
    missing = sorted((s for s in images if s not in masks), key=_natural_key)
    if missing:
        shown = ", ".join(str(images[s]) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} image(s) without a mask in {mask_dir}: {shown}")
    orphans = sorted(s for s in masks if s not in images)
    if orphans:
        logger.warning("%d mask(s) in %s have no image and are ignored: %s", len(orphans), mask_dir, orphans[:5])
    return [load_pair(images[s], masks[s], s) for s in sorted(images, key=_natural_key)]


# ------------------------------------------------------------------------------------- splits


def split_train_val(
    examples: Sequence[Example],
    val_fraction: float,
    by: Literal["image", "patient"] = "image",
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Splits examples into (train, val), deterministically for a given seed.

    The split depends only on the example names (and patients) and the seed, not on list order, so
    the same validation images come back however the dataset was listed. ``by="patient"`` keeps all
    images of a patient on one side (no patient leaks between train and val): patients are taken in
    seeded order until the validation side holds at least ``val_fraction`` of the *images*. Whenever
    ``val_fraction > 0`` and there are at least two units (images or patients), val gets at least
    one unit and train keeps at least one. Both outputs keep the input order.

    Raises:
      DataError: a bad fraction or ``by``, duplicate names, or ``by="patient"`` with missing IDs.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if by not in ("image", "patient"):
        raise DataError(f"split_by must be 'image' or 'patient', got {by!r}")
    examples = list(examples)
    names = [e.name for e in examples]
    if len(set(names)) != len(names):
        raise DataError("example names are not unique; cannot split deterministically")
    if val_fraction == 0.0 or len(examples) < 2:
        return examples, []
    rng = np.random.default_rng(seed)
    target = max(1, int(round(val_fraction * len(examples))))
    if by == "image":
        order = sorted(names, key=_natural_key)
        target = min(target, len(order) - 1)
        val_names = {order[i] for i in rng.permutation(len(order))[:target]}
    else:
        no_id = [e.name for e in examples if e.patient is None]
        if no_id:
            raise DataError(
                f"split_by='patient' needs a patient ID for every image (GlaS Grade.csv); "
                f"{len(no_id)} have none, e.g. {no_id[:3]}"
            )
        by_patient: dict[str, list[str]] = {}
        for e in examples:
            by_patient.setdefault(str(e.patient), []).append(e.name)
        patients = sorted(by_patient, key=_natural_key)
        if len(patients) < 2:
            return examples, []
        val_names = set()
        taken = 0
        for i in rng.permutation(len(patients)):
            if len(val_names) >= target or taken == len(patients) - 1:
                break
            val_names.update(by_patient[patients[i]])
            taken += 1
    train = [e for e in examples if e.name not in val_names]
    val = [e for e in examples if e.name in val_names]
    return train, val
