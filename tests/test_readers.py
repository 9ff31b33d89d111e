"""Readers: every supported format loads exactly, and every bad input fails with a message naming it.

Fixtures are tiny images written to tmp_path; the real GlaS data is never touched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from micronet_jax.data import DataError, Example, load_folder, load_glas, split_train_val
from micronet_jax.data.readers import load_pair, read_image, read_label
from micronet_jax.data.synthetic import write_glas_layout

H, W = 24, 32


def _example(i: int, patient: str | None = None, grade: str | None = None) -> Example:
    """A small deterministic example with two glands whose pixels encode ``i``."""
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    label = np.zeros((H, W), np.int32)
    label[2:10, 3:12] = 1
    label[12:20, 10 + i % 5 : 25] = 2
    return Example(name=f"ex{i}", image=image, label=label, grade=grade, patient=patient)


def _write_rgb(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def glas_dir(tmp_path: Path) -> tuple[Path, list[Example]]:
    """Official layout: 12 train (BMP, with Grade.csv, 4 patients) + 3 testA (PNG)."""
    train = [_example(i, patient=str(i % 4 + 1), grade="benign" if i % 2 else "malignant") for i in range(12)]
    write_glas_layout(train, tmp_path, prefix="train", ext="bmp")
    write_glas_layout([_example(100 + i) for i in range(3)], tmp_path, prefix="testA", ext="png")
    return tmp_path, train


# ----------------------------------------------------------------------------- single files


@pytest.mark.parametrize("ext", ["bmp", "png", "tif", "tiff"])
def test_read_image_lossless_formats_exact(tmp_path: Path, ext: str) -> None:
    arr = _example(0).image
    got = read_image(_write_rgb(tmp_path / f"a.{ext}", arr))
    assert got.dtype == np.uint8 and got.shape == (H, W, 3)
    np.testing.assert_array_equal(got, arr)


def test_read_image_jpeg(tmp_path: Path) -> None:
    arr = np.full((H, W, 3), (200, 120, 190), np.uint8)
    got = read_image(_write_rgb(tmp_path / "a.jpg", arr))
    assert got.shape == (H, W, 3) and np.abs(got.astype(int) - arr).max() <= 3


def test_read_image_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DataError, match="nope.png"):
        read_image(path)


def test_read_image_corrupt_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bmp"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="garbage.bmp"):
        read_image(garbage)
    truncated = tmp_path / "truncated.png"
    _write_rgb(truncated, _example(1).image)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(DataError, match="truncated.png"):
        read_image(truncated)


def test_read_image_grayscale_replicated_with_warning(tmp_path: Path, caplog) -> None:
    gray = _example(2).image[..., 0]
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    with caplog.at_level(logging.WARNING):
        got = read_image(path)
    assert got.shape == (H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], gray)
    assert "gray.png" in caplog.text


def test_read_image_rgba_alpha_dropped_with_warning(tmp_path: Path, caplog) -> None:
    rgba = np.concatenate([_example(3).image, np.full((H, W, 1), 7, np.uint8)], axis=-1)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    with caplog.at_level(logging.WARNING):
        got = read_image(path)
    np.testing.assert_array_equal(got, rgba[..., :3])
    assert "alpha.png" in caplog.text and "alpha" in caplog.text


def test_read_image_palette_converted(tmp_path: Path, caplog) -> None:
    path = tmp_path / "pal.png"
    Image.fromarray(_example(4).image).convert("P").save(path)
    with caplog.at_level(logging.WARNING):
        got = read_image(path)
    assert got.shape == (H, W, 3) and got.dtype == np.uint8
    assert "pal.png" in caplog.text


def test_read_image_16bit_scaled(tmp_path: Path) -> None:
    a = np.array([[0, 257, 65535, 32896]], np.uint16).repeat(4, 0)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    got = read_image(path)
    np.testing.assert_array_equal(got[0, :, 0], [0, 1, 255, 128])
    assert got.shape == (4, 4, 3)


def test_read_label_formats(tmp_path: Path) -> None:
    lab = _example(0).label
    Image.fromarray(lab.astype(np.uint8), mode="L").save(tmp_path / "l8.bmp")
    big = lab * 300  # Ids above 255 need 16 bits.
    Image.fromarray(big.astype(np.uint16)).save(tmp_path / "l16.png")
    Image.fromarray(np.repeat(lab.astype(np.uint8)[..., None], 3, -1)).save(tmp_path / "rgb_equal.png")
    for name, want in [("l8.bmp", lab), ("l16.png", big), ("rgb_equal.png", lab)]:
        got = read_label(tmp_path / name)
        assert got.dtype == np.int32 and got.shape == (H, W), name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_read_label_colour_mask_rejected(tmp_path: Path) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[2:5, 2:5] = (255, 0, 0)
    path = tmp_path / "colour_anno.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DataError, match=r"colour_anno\.png.*single-channel integer labels"):
        read_label(path)


def test_read_label_float_rejected(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((H, W), np.float32)).save(path)
    with pytest.raises(DataError, match=r"float\.tif.*single-channel integer labels"):
        read_label(path)


def test_load_pair_size_mismatch_names_both(tmp_path: Path) -> None:
    img = _write_rgb(tmp_path / "img.png", _example(0).image)
    lab = tmp_path / "lab.png"
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(lab)
    with pytest.raises(DataError) as err:
        load_pair(img, lab, "x")
    msg = str(err.value)
    assert "img.png" in msg and "lab.png" in msg and f"{W}x{H}" in msg and f"{W}x{H + 1}" in msg


# ----------------------------------------------------------------------------------- GlaS


def test_load_glas_roundtrip_bmp_and_grades(glas_dir) -> None:
    root, train = glas_dir
    got = load_glas(root, "train")
    assert [e.name for e in got] == [f"train_{n}" for n in range(1, 13)]  # Numeric, not lexical.
    for want, ex in zip(train, got):
        np.testing.assert_array_equal(ex.image, want.image)
        np.testing.assert_array_equal(ex.label, want.label)
        assert ex.image.dtype == np.uint8 and ex.label.dtype == np.int32
        assert (ex.grade, ex.patient) == (want.grade, want.patient)
    test_a = load_glas(root, "testA")
    assert [e.name for e in test_a] == ["testA_1", "testA_2", "testA_3"]
    assert test_a[0].grade is None and test_a[0].patient is None  # Not in Grade.csv.


def test_load_glas_grade_csv_official_header(tmp_path: Path) -> None:
    write_glas_layout([_example(0), _example(1)], tmp_path, write_grades=False)
    (tmp_path / "Grade.csv").write_text(
        "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\n"
        "train_1,2, malignant, moderately differentiated\n"
        " train_2 , 13 , benign, healthy\n"
    )
    got = load_glas(tmp_path, "train")
    assert [(e.grade, e.patient) for e in got] == [("malignant", "2"), ("benign", "13")]


def test_load_glas_prefers_lossless(tmp_path: Path) -> None:
    ex = _example(0)
    write_glas_layout([ex], tmp_path, ext="png")
    blurred = np.full_like(ex.image, 128)
    _write_rgb(tmp_path / "train_1.jpg", blurred)
    np.testing.assert_array_equal(load_glas(tmp_path, "train")[0].image, ex.image)


def test_load_glas_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does_not_exist"):
        load_glas(tmp_path / "does_not_exist", "train")


def test_load_glas_no_images_of_split(glas_dir) -> None:
    root, _ = glas_dir
    with pytest.raises(DataError, match=rf"no testB_\* images in {root}"):
        load_glas(root, "testB")


def test_load_glas_missing_anno(glas_dir) -> None:
    root, _ = glas_dir
    (root / "train_7_anno.bmp").unlink()
    with pytest.raises(DataError, match=r"train_7\.bmp"):
        load_glas(root, "train")


def test_load_glas_mismatched_mask_names_files(glas_dir) -> None:
    root, _ = glas_dir
    Image.fromarray(np.zeros((H, W + 3), np.uint8)).save(root / "train_3_anno.bmp")
    with pytest.raises(DataError, match=r"train_3\.bmp.*train_3_anno\.bmp"):
        load_glas(root, "train")


# --------------------------------------------------------------------------------- splits


def test_split_by_image_deterministic_disjoint(glas_dir) -> None:
    examples = load_glas(glas_dir[0], "train")
    tr1, va1 = split_train_val(examples, 0.25, by="image", seed=3)
    tr2, va2 = split_train_val(list(reversed(examples)), 0.25, by="image", seed=3)
    names = lambda xs: sorted(e.name for e in xs)  # noqa: E731
    assert names(va1) == names(va2) and names(tr1) == names(tr2)  # Independent of list order.
    assert len(va1) == 3 and not set(names(tr1)) & set(names(va1))
    assert set(names(tr1)) | set(names(va1)) == set(names(examples))
    _, va_other = split_train_val(examples, 0.25, by="image", seed=4)
    assert names(va_other) != names(va1)  # The seed matters (true for these two seeds).


def test_split_by_patient_keeps_patients_together(glas_dir) -> None:
    examples = load_glas(glas_dir[0], "train")
    tr, va = split_train_val(examples, 0.3, by="patient", seed=0)
    assert va and tr
    assert not {e.patient for e in tr} & {e.patient for e in va}
    assert len(tr) + len(va) == len(examples)
    tr2, va2 = split_train_val(examples, 0.3, by="patient", seed=0)
    assert [e.name for e in va2] == [e.name for e in va]


def test_split_minimum_one_val_and_zero_fraction() -> None:
    examples = [_example(i) for i in range(3)]
    tr, va = split_train_val(examples, 0.01, by="image", seed=0)
    assert len(va) == 1 and len(tr) == 2
    tr, va = split_train_val(examples, 0.0, by="image", seed=0)
    assert va == [] and len(tr) == 3


def test_split_by_patient_requires_ids() -> None:
    with pytest.raises(DataError, match="patient"):
        split_train_val([_example(0), _example(1)], 0.5, by="patient", seed=0)


# --------------------------------------------------------------------------- folder dataset


def test_load_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    exs = {"b10": _example(0), "b2": _example(1)}
    _write_rgb(tmp_path / "images" / "b10.jpg", exs["b10"].image)
    _write_rgb(tmp_path / "images" / "b2.tif", exs["b2"].image)
    for stem, ex in exs.items():
        Image.fromarray(ex.label.astype(np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    got = load_folder(tmp_path)
    assert [e.name for e in got] == ["b2", "b10"]
    np.testing.assert_array_equal(got[0].image, exs["b2"].image)
    np.testing.assert_array_equal(got[1].label, exs["b10"].label)


def test_load_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="images"):
        load_folder(tmp_path)  # No images/ folder.
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"no images"):
        load_folder(tmp_path)
    _write_rgb(tmp_path / "images" / "lonely.png", _example(0).image)
    with pytest.raises(DataError, match=r"lonely\.png"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="missing_root"):
        load_folder(tmp_path / "missing_root")
