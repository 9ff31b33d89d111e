"""Synthetic glands: deterministic, valid instance labels, touching glands, H&E-like colours.

Most checks use small images (fast); one generates a full GlaS-size image to check the defaults.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from micronet_jax.config import base_config
from micronet_jax.data import DataError, load_glas, load_split, make_synthetic_glands
from micronet_jax.data.synthetic import write_glas_layout

SMALL = dict(height=192, width=256)


@pytest.fixture(scope="module")
def small() -> list:
    return make_synthetic_glands(6, seed=5, **SMALL)


def _touching_pairs(label: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different non-zero ids that are 4-neighbours somewhere."""
    pairs = set()
    for a, b in ((label[:, 1:], label[:, :-1]), (label[1:, :], label[:-1, :])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[m].tolist(), b[m].tolist())}
    return pairs


def test_deterministic_bit_for_bit_and_prefix_stable(small) -> None:
    again = make_synthetic_glands(6, seed=5, **SMALL)
    fewer = make_synthetic_glands(2, seed=5, **SMALL)
    for a, b in zip(small, again):
        assert a.name == b.name and a.grade == b.grade and a.patient == b.patient
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    for a, b in zip(small, fewer):  # Image i does not depend on num_images.
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    other = make_synthetic_glands(1, seed=6, **SMALL)[0]
    assert not np.array_equal(other.image, small[0].image)


def test_shapes_dtypes_and_instance_labels(small) -> None:
    for ex in small:
        assert ex.image.shape == (192, 256, 3) and ex.image.dtype == np.uint8
        assert ex.label.shape == (192, 256) and ex.label.dtype == np.int32
        ids = np.unique(ex.label)
        k = int(ids.max())
        assert np.array_equal(ids, np.arange(k + 1)), "ids must be exactly 0..K"
        assert k >= 3, f"{ex.name}: expected several glands, got {k}"
        for gid in range(1, k + 1):  # Each gland is one connected object.
            _, n = ndimage.label(ex.label == gid)
            assert n == 1, f"{ex.name}: gland {gid} has {n} pieces"
        assert ex.grade in ("benign", "malignant") and ex.patient is not None


def test_touching_glands_exist(small) -> None:
    touching = [len(_touching_pairs(ex.label)) for ex in small]
    assert sum(touching) >= 2 and sum(t > 0 for t in touching) >= 2, touching


def test_he_like_colours(small) -> None:
    for ex in small:
        img = ex.image.astype(np.float64)
        r, g, b = img[..., 0].mean(), img[..., 1].mean(), img[..., 2].mean()
        assert r > g + 30 and b > g + 30, (ex.name, r, g, b)  # Pink/purple: low green.
        # Lumens are pale and nuclei dark: the gland area spans a wide range of intensity.
        gray = img.mean(-1)[ex.label > 0]
        assert np.percentile(gray, 95) > 200 and np.percentile(gray, 2) < 130
        # Stroma (background) is pinker than glands (more haematoxylin in epithelium).
        bg = img[ex.label == 0]
        assert bg[:, 0].mean() > bg[:, 1].mean() + 50


def test_full_size_defaults() -> None:
    (ex,) = make_synthetic_glands(1, seed=0)
    assert ex.image.shape == (522, 775, 3) and ex.label.shape == (522, 775)
    assert 4 <= ex.label.max() <= 40
    coverage = (ex.label > 0).mean()
    assert 0.2 < coverage < 0.7


def test_write_glas_layout_roundtrip(tmp_path: Path) -> None:
    exs = make_synthetic_glands(3, seed=1, height=64, width=80)
    write_glas_layout(exs, tmp_path, prefix="train", ext="bmp")
    write_glas_layout(exs[:1], tmp_path, prefix="testB", ext="jpg")  # Masks go lossless (PNG).
    assert (tmp_path / "train_1.bmp").is_file() and (tmp_path / "train_3_anno.bmp").is_file()
    assert (tmp_path / "testB_1_anno.png").is_file()
    got = load_glas(tmp_path, "train")
    for a, b in zip(exs, got):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        assert (a.grade, a.patient) == (b.grade, b.patient)
    np.testing.assert_array_equal(load_glas(tmp_path, "testB")[0].label, exs[0].label)


def _data_config(**kw) -> ml_collections.ConfigDict:
    c = base_config().data
    c.synthetic_height, c.synthetic_width = 48, 64
    c.synthetic_num_train, c.synthetic_num_val = 3, 2
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_load_split_synthetic_distinct_seeded_splits() -> None:
    c = _data_config(source="synthetic")
    train, val, test_a = (load_split(c, s) for s in ("train", "val", "testA"))
    assert len(train) == 3 and len(val) == 2 and len(test_a) == 2
    assert [e.name for e in val] == ["synthetic_val_1", "synthetic_val_2"]
    assert not np.array_equal(train[0].image, val[0].image)
    assert len(load_split(c, "train_all")) == 5
    np.testing.assert_array_equal(load_split(c, "train")[1].image, train[1].image)
    c2 = _data_config(source="synthetic", val_split_seed=1)
    assert not np.array_equal(load_split(c2, "train")[0].image, train[0].image)


def test_load_split_glas_and_folder(tmp_path: Path) -> None:
    exs = make_synthetic_glands(5, seed=2, height=32, width=40)
    write_glas_layout(exs, tmp_path / "glas", ext="png")
    c = _data_config(source="glas", root=str(tmp_path / "glas"), val_fraction=0.4)
    train, val = load_split(c, "train"), load_split(c, "val")
    assert len(train) == 3 and len(val) == 2
    assert {e.name for e in train} | {e.name for e in val} == {f"train_{i}" for i in range(1, 6)}
    assert len(load_split(c, "train_all")) == 5
    with pytest.raises(DataError, match="testA"):
        load_split(c, "testA")
    c.split_by = "patient"
    tr, va = load_split(c, "train"), load_split(c, "val")
    assert not {e.patient for e in tr} & {e.patient for e in va}

    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, ex in enumerate(exs):
        write_glas_layout([ex], tmp_path / "tmp", prefix=f"s{i}", ext="png", write_grades=False)
        (tmp_path / "tmp" / f"s{i}_1.png").rename(folder / "images" / f"s{i}.png")
        (tmp_path / "tmp" / f"s{i}_1_anno.png").rename(folder / "masks" / f"s{i}.png")
    cf = _data_config(source="folder", root=str(folder), val_fraction=0.2)
    assert len(load_split(cf, "train")) == 4 and len(load_split(cf, "val")) == 1
    with pytest.raises(DataError, match="testA"):
        load_split(cf, "testA")


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="config data.root is not set"):
        load_split(_data_config(source="glas"), "train")
    with pytest.raises(DataError, match="config data.root is not set"):
        load_split(_data_config(source="folder"), "val")
    with pytest.raises(DataError, match="split 'val'.*empty"):
        load_split(_data_config(source="synthetic", synthetic_num_val=0), "val")
    with pytest.raises(DataError, match="unknown data.source"):
        load_split(_data_config(source="imagenet"), "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split(_data_config(source="synthetic"), "validation")
    with pytest.raises(DataError, match="nowhere"):
        load_split(_data_config(source="glas", root=str(tmp_path / "nowhere")), "train")
