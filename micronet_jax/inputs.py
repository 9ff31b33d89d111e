"""The network's input convention, shared by training and inference (spec §7.14).

``data.normalize="crop"`` (the default, TIAToolbox's convention): training standardises each 508
crop (:mod:`micronet_jax.data.pipeline`), inference each tile
(:func:`micronet_jax.evaluate.predict_probabilities`). ``"image"``: both use the statistics of the
whole (resampled) image the crop or tile comes from, so a gland's input values do not depend on
what else the crop or tile holds. Whole slides use one tissue-sampled mean and std per slide
(:mod:`micronet_jax.wsi`), the "image" convention at slide scale. Below both the data package and
evaluation, so neither imports the other for it.
"""

from __future__ import annotations

import numpy as np


def moments(image: np.ndarray) -> tuple[float, float]:
    """Mean and std of a uint8 (H, W, C) image on the 0-1 scale, over all pixels and channels; the
    std is floored at ``1/sqrt(N)`` like ``tf.image.per_image_standardization``, so a constant
    image maps to 0 rather than dividing by zero. Exact, from a 256-bin histogram (one integer pass
    instead of float mean and variance passes)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"moments needs a uint8 image, got {image.dtype}")
    counts = np.bincount(image.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = max(image.size, 1)
    mean = float(counts @ values) / n
    var = max(float(counts @ (values - mean) ** 2) / n, 0.0)
    return mean, max(float(np.sqrt(var)), 1.0 / np.sqrt(n))


def standardize_with(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``(x / 255 - mean) / std`` as float32, with statistics from elsewhere (the whole image under
    ``data.normalize="image"``, the slide in :mod:`micronet_jax.wsi`). One fused affine pass."""
    scale = 1.0 / (255.0 * std)
    out = np.asarray(image).astype(np.float32)
    out *= np.float32(scale)
    out -= np.float32(mean * 255.0 * scale)
    return out


def standardize(image: np.ndarray) -> np.ndarray:
    """/255 then per-image standardisation over all pixels and channels (spec §2 [TIA], §7.14).

    ``(x - mean) / max(std, 1/sqrt(N))`` with N the number of values, like
    ``tf.image.per_image_standardization``; the floor keeps a constant image finite (it maps to 0).
    Accepts (H, W, C) or a batch (..., H, W, C) (each image separately); input is on the 0-255 scale.
    Shared by training and inference so both see identically normalised inputs.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.ndim == 3:
        return standardize_with(image, *moments(image))
    x = image.astype(np.float32) / np.float32(255.0)
    axes = (-3, -2, -1) if x.ndim >= 3 else tuple(range(x.ndim))
    n = int(np.prod([x.shape[a] for a in axes]))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    denom = np.maximum(std, 1.0 / np.sqrt(n))
    return ((x - mean) / denom).astype(np.float32)
