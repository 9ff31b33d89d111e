"""The network's input convention, shared by training and inference (spec §7.14).

Training standardises each 508 crop (:mod:`micronet_jax.data.pipeline`), inference each tile
(:func:`micronet_jax.evaluate.predict_probabilities`); whole slides use one tissue-sampled mean and
std per slide (:mod:`micronet_jax.wsi`). Below both the data package and evaluation, so neither
imports the other for it.
"""

from __future__ import annotations

import numpy as np


def standardize(image: np.ndarray) -> np.ndarray:
    """/255 then per-image standardisation over all pixels and channels (spec §2 [TIA], §7.14).

    ``(x - mean) / max(std, 1/sqrt(N))`` with N the number of values, like
    ``tf.image.per_image_standardization``; the floor keeps a constant image finite (it maps to 0).
    Accepts (H, W, C) or a batch (..., H, W, C) (each image separately); input is on the 0-255 scale.
    Shared by training and inference so both see identically normalised inputs.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8 and image.ndim == 3:
        # Exact moments from a 256-bin histogram: one integer pass instead of float mean + var passes.
        counts = np.bincount(image.reshape(-1), minlength=256).astype(np.float64)
        values = np.arange(256, dtype=np.float64) / 255.0
        n = image.size
        mean = float(counts @ values) / n
        var = max(float(counts @ (values - mean) ** 2) / n, 0.0)
        scale = 1.0 / (255.0 * max(np.sqrt(var), 1.0 / np.sqrt(n)))
        # One fused affine pass: (x / 255 - mean) / denom == x * scale - mean * 255 * scale.
        out = image.astype(np.float32)
        out *= np.float32(scale)
        out -= np.float32(mean * 255.0 * scale)
        return out
    x = image.astype(np.float32) / np.float32(255.0)
    axes = (-3, -2, -1) if x.ndim >= 3 else tuple(range(x.ndim))
    n = int(np.prod([x.shape[a] for a in axes]))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    denom = np.maximum(std, 1.0 / np.sqrt(n))
    return ((x - mean) / denom).astype(np.float32)
