"""TFDS builder: build a tiny GlaS folder into ArrayRecord and read it back without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
grain = pytest.importorskip("grain")

from micronet_jax.data.readers import DataError  # noqa: E402
from micronet_jax.data.synthetic import make_synthetic_glands, write_glas_layout  # noqa: E402
from micronet_jax.data.tfds_glas import (  # noqa: E402
    build_glas_tfds,
    example_from_record,
    glas_data_source,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list, list]:
    """3 train + 2 testA 64x80 images (BMP, official names) built into a TFDS data_dir."""
    root = tmp_path_factory.mktemp("tfds")
    manual = root / "manual"
    train = make_synthetic_glands(3, height=64, width=80, seed=11)
    test_a = make_synthetic_glands(2, height=64, width=80, seed=12)
    # Ids above 255 must survive (an 8-bit label format would not).
    big = train[2].label.copy()
    big[big > 0] += 300
    train[2] = type(train[2])(name=train[2].name, image=train[2].image, label=big, grade=None, patient=None)
    write_glas_layout(train, manual, prefix="train", ext="png")
    write_glas_layout(test_a, manual, prefix="testA", ext="bmp")
    build_glas_tfds(manual, root / "data")
    return root / "data", train, test_a


def test_splits_and_pixels_roundtrip(built) -> None:
    data_dir, train, test_a = built
    for split, want in (("train", train), ("testA", test_a)):
        source = glas_data_source(data_dir, split)
        assert len(source) == len(want)
        for i, ex_want in enumerate(want):  # Official order is kept.
            ex = example_from_record(source[i])
            assert ex.name == f"{split}_{i + 1}"
            assert ex.image.dtype == np.uint8 and ex.image.shape == (64, 80, 3)
            assert ex.label.dtype == np.int32 and ex.label.shape == (64, 80)
            np.testing.assert_array_equal(ex.image, ex_want.image)
            np.testing.assert_array_equal(ex.label, ex_want.label)
    first = example_from_record(glas_data_source(data_dir, "train")[0])
    assert (first.grade, first.patient) == (train[0].grade, train[0].patient)
    last = example_from_record(glas_data_source(data_dir, "train")[2])
    assert last.grade is None and last.patient is None
    with pytest.raises(DataError, match="'testB' is not in"):
        glas_data_source(data_dir, "testB")  # Not in the folder, so not built.
    with pytest.raises(DataError, match="no built GlaS"):
        glas_data_source(data_dir.parent / "elsewhere", "train")


def test_grain_map_dataset(built) -> None:
    data_dir, train, _ = built
    ds = grain.MapDataset.source(glas_data_source(data_dir, "train")).map(example_from_record)
    assert len(ds) == 3
    got = {ex.name: ex for ex in ds}
    for i, want in enumerate(train):
        np.testing.assert_array_equal(got[f"train_{i + 1}"].image, want.image)
        np.testing.assert_array_equal(got[f"train_{i + 1}"].label, want.label)
    shuffled = [ex.name for ex in ds.shuffle(seed=0)]
    assert sorted(shuffled) == sorted(got)


def test_rebuild_reuses_existing(built) -> None:
    data_dir, _, _ = built
    files = sorted(p.name for p in (data_dir / "glas" / "1.0.0").iterdir())
    build_glas_tfds(data_dir.parent / "manual", data_dir)  # No error, nothing rewritten.
    assert sorted(p.name for p in (data_dir / "glas" / "1.0.0").iterdir()) == files


def test_data_package_does_not_import_tfds() -> None:
    code = "import sys, micronet_jax.data; print('tensorflow_datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_command_line_build(built, tmp_path, capsys) -> None:
    """The TF-free stand-in for ``tfds build`` (whose CLI imports TensorFlow in tfds 4.9)."""
    from micronet_jax.data import tfds_glas

    manual = built[0].parent / "manual"
    tfds_glas.main(["--manual_dir", str(manual), "--data_dir", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "train: 3 records" in out and "testA: 2 records" in out and "testB" not in out
