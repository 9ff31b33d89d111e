"""U-Net weight map (spec §4, §7.11): hand-made disk glands with known geometry."""

import time

import numpy as np
import pytest
from scipy import ndimage

from micronet_jax.data.weight_map import (
    CUTOFF_SIGMAS,
    class_weight_map,
    class_weights,
    unet_weight_map,
)


def _disk(label: np.ndarray, cy: int, cx: int, r: int, inst: int) -> None:
    yy, xx = np.ogrid[: label.shape[0], : label.shape[1]]
    label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = inst


def _two_close_disks() -> np.ndarray:
    label = np.zeros((80, 120), np.int32)
    _disk(label, 40, 35, 15, 1)  # right edge at x = 50
    _disk(label, 40, 69, 15, 2)  # left edge at x = 54
    return label


def _brute_force(label: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    ids = [i for i in np.unique(label) if i]
    d = np.sort(np.stack([ndimage.distance_transform_edt(label != i) for i in ids]), axis=0)
    return np.where(label > 0, 0.0, w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2)))


def test_gap_between_close_glands_is_heavily_weighted():
    label = _two_close_disks()
    w = unet_weight_map(label, w0=10.0, sigma=5.0, class_balance=True)
    w_bg, w_fg = class_weights(label)
    gap = w[40, 52]  # background pixel 2 px from each disk: d1 + d2 = 4
    far = w[5, 5]
    assert label[40, 52] == 0 and label[5, 5] == 0
    assert gap == pytest.approx(w_bg + 10.0 * np.exp(-16 / 50), rel=1e-4)
    assert gap > 5 * far
    assert far == pytest.approx(w_bg, abs=1e-6)
    # Glands themselves carry only their class weight.
    assert np.allclose(w[label > 0], w_fg)


def test_matches_brute_force_within_cutoff_error():
    rng = np.random.default_rng(0)
    label = np.zeros((150, 200), np.int32)
    for i in range(1, 9):
        _disk(label, int(rng.integers(15, 135)), int(rng.integers(15, 185)), int(rng.integers(6, 18)), i)
    got = unet_weight_map(label, w0=10.0, sigma=5.0, class_balance=False)
    ref = 1.0 + _brute_force(label, 10.0, 5.0)
    assert np.abs(got - ref).max() <= 10.0 * np.exp(-(CUTOFF_SIGMAS**2) / 2) + 1e-5


def test_class_balance_normalisation():
    label = np.zeros((50, 40), np.int32)
    label[:10] = 3  # 20 % gland
    w = class_weight_map(label)
    assert w.dtype == np.float32 and w.shape == label.shape
    assert w.mean() == pytest.approx(1.0, rel=1e-6)  # mean weight over pixels is 1
    assert w[label > 0].sum() == pytest.approx(w[label == 0].sum(), rel=1e-6)  # classes balanced
    assert class_weights(np.zeros((4, 4), np.int32)) == (1.0, 1.0)
    assert np.all(class_weight_map(label, class_balance=False) == 1.0)


def test_single_instance_has_no_distance_term_and_w0_zero_is_class_only():
    label = np.zeros((60, 60), np.int32)
    _disk(label, 30, 30, 10, 7)
    np.testing.assert_array_equal(unet_weight_map(label), class_weight_map(label))
    two = _two_close_disks()
    np.testing.assert_array_equal(unet_weight_map(two, w0=0.0), class_weight_map(two))


def test_sparse_huge_ids_give_same_map():
    label = _two_close_disks()
    big = np.where(label > 0, label + 10**7, 0)
    np.testing.assert_allclose(unet_weight_map(big), unet_weight_map(label))


def test_glas_sized_image_is_fast():
    rng = np.random.default_rng(1)
    label = np.zeros((522, 775), np.int32)
    for i in range(1, 41):
        _disk(label, int(rng.integers(30, 490)), int(rng.integers(30, 745)), int(rng.integers(10, 45)), i)
    t0 = time.perf_counter()
    w = unet_weight_map(label)
    assert time.perf_counter() - t0 < 1.0
    assert np.isfinite(w).all() and w.min() > 0
