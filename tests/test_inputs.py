"""The input standardisation shared by training and inference (moved from test_augment.py)."""

import numpy as np
import pytest

from micronet_jax.inputs import standardize


def test_standardize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x = standardize(image)
    assert x.dtype == np.float32 and x.shape == image.shape
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, abs=1e-4)
    const = standardize(np.full((8, 8, 3), 77, np.uint8))
    assert np.isfinite(const).all() and np.allclose(const, 0.0)
    batch = standardize(np.stack([image, image[::-1] // 2]))
    np.testing.assert_allclose(batch[0], x, atol=1e-6)
    np.testing.assert_allclose(batch[1], standardize(image[::-1] // 2), atol=1e-6)


def test_standardize_with_given_statistics_matches_standardize_with_its_own():
    from micronet_jax.config import check_normalize
    from micronet_jax.inputs import moments, standardize_with

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    mean, std = moments(image)
    x = image.astype(np.float64) / 255.0
    assert mean == pytest.approx(x.mean(), abs=1e-12) and std == pytest.approx(x.std(), abs=1e-12)
    np.testing.assert_allclose(standardize_with(image, mean, std), standardize(image), atol=1e-6)
    # A part standardised with the whole image's statistics is the whole's standardisation there.
    np.testing.assert_allclose(standardize_with(image[5:15, 2:9], mean, std), standardize(image)[5:15, 2:9],
                               atol=1e-6)
    assert moments(np.full((4, 4, 3), 9, np.uint8))[1] == pytest.approx(1 / np.sqrt(48))
    check_normalize("crop")
    check_normalize("image")
    with pytest.raises(ValueError, match="data.normalize='whole'"):
        check_normalize("whole")
