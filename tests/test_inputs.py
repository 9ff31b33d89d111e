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
