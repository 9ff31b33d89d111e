"""Overlay and label images for quick visual checks of predictions (numpy + skimage + PIL only).

Outlines rather than filled masks, so the tissue under a gland stays visible; prediction and ground truth
in different fixed colours, so splits and merges are obvious at a glance.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

__all__ = ["overlay_outlines", "colorize_labels", "save_png"]

PRED_COLOUR = (0, 255, 0)  # green
GT_COLOUR = (255, 255, 0)  # yellow


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    elif img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3]
    elif img.ndim == 3 and img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    else:
        raise ValueError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
    return np.array(img, dtype=np.uint8, copy=True)


def _outline(labels: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != shape:
        raise ValueError(f"{name} shape {lab.shape} does not match image shape {shape}")
    # mode="thick": both sides of every boundary, i.e. 2 px; also separates touching instances.
    return find_boundaries(lab, connectivity=1, mode="thick", background=0)


def overlay_outlines(
    image_uint8: np.ndarray,
    pred_labels: np.ndarray,
    gt_labels: np.ndarray | None = None,
    pred_colour: Sequence[int] = PRED_COLOUR,
    gt_colour: Sequence[int] = GT_COLOUR,
) -> np.ndarray:
    """RGB uint8 copy of the image with 2-px instance outlines: prediction green, GT yellow.

    The prediction is drawn last, so where both outlines coincide the prediction's colour shows.
    """
    out = _as_rgb_uint8(image_uint8)
    shape = out.shape[:2]
    if gt_labels is not None:
        out[_outline(gt_labels, shape, "gt_labels")] = np.asarray(gt_colour, np.uint8)
    out[_outline(pred_labels, shape, "pred_labels")] = np.asarray(pred_colour, np.uint8)
    return out


def _id_colours(ids: np.ndarray) -> np.ndarray:
    """Deterministic bright colour per id: golden-ratio hue steps keep neighbouring ids distinct."""
    h = (ids.astype(np.float64) * 0.618033988749895) % 1.0
    s, v = 0.85, 1.0
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    vv = np.full_like(h, v)
    pp = np.full_like(h, p)
    r = np.choose(i, [vv, q, pp, pp, t, vv])
    g = np.choose(i, [t, vv, vv, q, pp, pp])
    b = np.choose(i, [pp, pp, t, vv, vv, q])
    return np.round(np.stack([r, g, b], -1) * 255).astype(np.uint8)


def colorize_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) instance labels -> (H, W, 3) uint8; background black, each id a fixed bright colour."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {lab.shape}")
    ids, inv = np.unique(lab, return_inverse=True)
    colours = _id_colours(ids)
    colours[ids == 0] = 0
    return colours[inv.reshape(lab.shape)]


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes uint8 (H, W) / (H, W, 3) / (H, W, 4), uint16 (H, W) (label maps > 255) or bool as PNG.

    Creates the parent folder. Other dtypes are refused rather than silently rescaled.
    """
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype == np.uint16 and a.ndim == 2:
        img = Image.fromarray(a)
    elif a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        img = Image.fromarray(a)
    else:
        raise ValueError(f"save_png needs uint8 (H,W[,3|4]), uint16 (H,W) or bool; got {a.dtype} {a.shape}")
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    img.save(path, format="PNG")
