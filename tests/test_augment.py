"""Augmentation keeps image, label and weight map aligned; labels stay integer; standardisation."""

import numpy as np
import pytest

from micronet_jax.data import augment as A

ALL_ON = dict(
    enabled=True, flips=True, rot90=True, blur_prob=0.0, distortion_prob=1.0, distortion_max=0.2, stain_jitter=0.0
)


def _square_example(h: int = 90, w: int = 110):
    """A bright off-centre square: image 250, label 1, weight 5 there; elsewhere 20 / 0 / 1."""
    image = np.full((h, w, 3), 20, np.uint8)
    label = np.zeros((h, w), np.int32)
    weight = np.ones((h, w), np.float32)
    sl = (slice(15, 35), slice(60, 85))
    image[sl] = 250
    label[sl] = 1
    weight[sl] = 5.0
    return image, label, weight


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def _assert_aligned(image, label, weight, tol: float = 1.0):
    obj_img = image.mean(axis=-1) > 135
    obj_lab = label == 1
    obj_wt = weight > 3.0
    assert obj_lab.sum() > 50
    np.testing.assert_allclose(_centroid(obj_img), _centroid(obj_lab), atol=tol)
    np.testing.assert_allclose(_centroid(obj_wt), _centroid(obj_lab), atol=tol)
    # Pixel agreement apart from a thin interpolation rim.
    assert (obj_img != obj_lab).mean() < 0.02
    assert (obj_wt != obj_lab).mean() < 0.02


def test_flip_and_rot90_move_object_to_known_place():
    image, label, weight = _square_example()
    img, lab, wt = A.flip([image, label, weight], horizontal=True, vertical=False)
    assert lab[15, 110 - 85] == 1 and lab[15, 110 - 85 - 1] == 0
    img, lab, wt = A.rot90([image, label, weight], 1)  # CCW: (y, x) -> (W - 1 - x, y)
    assert lab.shape == (110, 90)
    assert lab[110 - 1 - 60, 15] == 1 and img[110 - 1 - 60, 15, 0] == 250 and wt[110 - 1 - 60, 15] == 5
    for k in range(4):
        for h in (False, True):
            for v in (False, True):
                arrays = A.rot90(A.flip([image, label, weight], h, v), k)
                np.testing.assert_array_equal(arrays[1] == 1, arrays[0][..., 0] == 250)
                np.testing.assert_array_equal(arrays[1] == 1, arrays[2] == 5)


def test_random_crop_uses_one_window_for_all():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:50, :60]
    coords = np.stack([yy, xx], axis=-1)
    a, b = A.random_crop([coords, yy * 1000 + xx], 20, rng)
    assert a.shape == (20, 20, 2) and b.shape == (20, 20)
    np.testing.assert_array_equal(a[..., 0] * 1000 + a[..., 1], b)
    with pytest.raises(ValueError):
        A.random_crop([yy], 51, rng)


def test_pad_to_min_modes():
    image, label, weight = _square_example(40, 70)
    img, lab, wt = A.pad_to_min([image, label, weight], 64)
    assert img.shape == (64, 70, 3) and lab.shape == (64, 70) and wt.shape == (64, 70)
    np.testing.assert_array_equal(img[12:52], image)  # split evenly: 12 above, 12 below
    np.testing.assert_array_equal(lab[11], label[1])  # reflect (edge row not repeated)
    _, lab0, wt0 = A.pad_to_min([image, label, weight], 64, modes=["reflect", ("constant", 0), ("constant", 0.7)])
    assert (lab0[:12] == 0).all() and np.allclose(wt0[:12], 0.7)
    same = A.pad_to_min([image], (10, 10))[0]
    assert same is image


def test_distortion_identity_and_barrel_direction():
    image, label, weight = _square_example()
    coords = A.radial_coordinates(label.shape, 0.0, 0.0)
    img, lab, wt = A.warp(image, label, weight, coords)
    np.testing.assert_array_equal(img, image)
    np.testing.assert_array_equal(lab, label)
    np.testing.assert_allclose(wt, weight)
    centre = (np.array(label.shape) - 1) / 2
    _, lab_b, _ = A.warp(image, label, weight, A.radial_coordinates(label.shape, 0.2))
    _, lab_p, _ = A.warp(image, label, weight, A.radial_coordinates(label.shape, -0.2))
    r0 = np.linalg.norm(_centroid(label == 1) - centre)
    assert np.linalg.norm(_centroid(lab_b == 1) - centre) < r0 - 1  # barrel pulls towards the centre
    assert np.linalg.norm(_centroid(lab_p == 1) - centre) > r0 + 1  # pincushion pushes outwards


@pytest.mark.parametrize("seed", range(12))
def test_augment_example_keeps_alignment(seed):
    rng = np.random.default_rng(seed)
    image, label, weight = _square_example()
    image, label, weight = A.random_crop([image, label, weight], 80, rng)
    img, lab, wt = A.augment_example(image, label, weight, ALL_ON, rng)
    assert img.dtype == np.uint8 and lab.dtype == np.int32 and wt.dtype == np.float32
    assert img.flags.c_contiguous and lab.flags.c_contiguous and wt.flags.c_contiguous
    _assert_aligned(img, lab, wt)


def test_labels_keep_only_existing_values_under_distortion():
    rng = np.random.default_rng(3)
    label = rng.choice(np.array([0, 3, 7], np.int32), size=(64, 64))
    image = np.zeros((64, 64, 3), np.uint8)
    weight = np.ones((64, 64), np.float32)
    for _ in range(5):
        _, lab, _ = A.random_radial_distortion(image, label, weight, 0.2, rng)
        assert lab.dtype == np.int32
        assert set(np.unique(lab)) <= {0, 3, 7}


def test_augment_is_deterministic_and_photometric_ops_touch_image_only():
    image, label, weight = _square_example()
    cfg = dict(ALL_ON, blur_prob=1.0, blur_sigma_min=0.5, blur_sigma_max=1.5, stain_jitter=0.1)
    out1 = A.augment_example(image, label, weight, cfg, np.random.default_rng(5))
    out2 = A.augment_example(image, label, weight, cfg, np.random.default_rng(5))
    for a, b in zip(out1, out2):
        np.testing.assert_array_equal(a, b)
    geo_only = dict(ALL_ON, blur_prob=0.0, stain_jitter=0.0)
    out3 = A.augment_example(image, label, weight, geo_only, np.random.default_rng(5))
    np.testing.assert_array_equal(out1[1], out3[1])  # same geometry draws come first
    np.testing.assert_array_equal(out1[2], out3[2])
    # Each photometric op, alone on top of the same geometry, changes the image (and only it).
    for only in (dict(blur_prob=1.0, blur_sigma_min=0.5, blur_sigma_max=1.5), dict(stain_jitter=0.1)):
        one = A.augment_example(image, label, weight, dict(geo_only, **only), np.random.default_rng(5))
        assert np.abs(one[0].astype(int) - out3[0]).mean() > 0.5, only
        np.testing.assert_array_equal(one[1], out3[1])
        np.testing.assert_array_equal(one[2], out3[2])
    off = A.augment_example(image, label, weight, dict(enabled=False), np.random.default_rng(0))
    np.testing.assert_array_equal(off[0], image)


def test_stain_jitter_changes_colour_deterministically():
    rng = np.random.default_rng(0)
    image = rng.integers(40, 230, (32, 32, 3), dtype=np.uint8)
    assert A.stain_jitter(image, 0.0, rng) is image
    a = A.stain_jitter(image, 0.2, np.random.default_rng(1))
    b = A.stain_jitter(image, 0.2, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - image).mean() > 1.0


def test_blur_smooths_image():
    image = np.zeros((20, 20, 3), np.uint8)
    image[10, 10] = 255
    out = A.gaussian_blur(image, 1.5)
    assert out[10, 10, 0] < 255 and out[10, 12, 0] > 0 and out.dtype == np.uint8


def test_warp_matches_scipy_map_coordinates():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (40, 56)).astype(np.int32)
    weight = rng.random((40, 56), dtype=np.float32)
    coords = A.radial_coordinates(label.shape, 0.17, -0.11)  # reaches outside: exercises mirroring
    coords += np.float32(0.013)  # avoid exact .5 ties, where nearest rounding is implementation-defined
    img, lab, wt = A.warp(image, label, weight, coords)
    for c in range(3):
        ref = ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="mirror")
        assert np.abs(img[..., c].astype(np.float32) - ref).max() <= 0.5 + 1e-3
    np.testing.assert_array_equal(lab, ndimage.map_coordinates(label, coords, order=0, mode="mirror"))
    np.testing.assert_allclose(wt, ndimage.map_coordinates(weight, coords, order=1, mode="mirror"), atol=1e-5)
