"""Resampling images, labels and probability maps by ``data.scale``.

Training sees every image resampled by ``data.scale``; inference resamples the input the same way and
the class probabilities back to the original size, so metrics are always computed at the resolution
of the ground truth. Images are resampled with area-weighted (anti-aliased) linear interpolation,
labels with nearest neighbour (instance ids must stay ids), probabilities linearly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from skimage.transform import resize


def scaled_shape(shape: Sequence[int], scale: float) -> tuple[int, int]:
    if not scale > 0:
        raise ValueError(f"config data.scale={scale} must be positive")
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def rescale_image(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (round(H*scale), round(W*scale), 3)."""
    if scale == 1.0:
        return image
    out = resize(image, scaled_shape(image.shape, scale), order=1, anti_aliasing=scale < 1,
                 preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def rescale_label(label: np.ndarray, scale: float) -> np.ndarray:
    """Instance ids resampled by nearest neighbour (no new ids, no blending)."""
    if scale == 1.0:
        return label
    out = resize(label, scaled_shape(label.shape, scale), order=0, anti_aliasing=False,
                 preserve_range=True)
    return out.astype(label.dtype)


def rescale_examples(examples: Sequence[Any], scale: float) -> list[Any]:
    """Examples (dataclasses with ``image`` and ``label``) with both resampled by ``scale``."""
    if float(scale) == 1.0:
        return list(examples)
    return [
        dataclasses.replace(e, image=rescale_image(e.image, scale), label=rescale_label(e.label, scale))
        for e in examples
    ]


def resize_probabilities(prob: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """float32 (h, w, C) -> (H, W, C), linear, renormalised so each pixel still sums to 1."""
    if tuple(prob.shape[:2]) == tuple(shape[:2]):
        return prob
    out = resize(prob, tuple(shape[:2]) + (prob.shape[2],), order=1, anti_aliasing=False)
    out = np.clip(out, 0.0, None).astype(np.float32)
    out /= np.maximum(out.sum(axis=-1, keepdims=True), np.float32(1e-12))
    return out
