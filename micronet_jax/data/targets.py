"""Training targets from instance labels: the paper's two classes, or three with a boundary band.

A two-class output (background, gland) cannot separate glands that touch: their pixels form one
connected component. The ``contour`` target adds a third class, a band along the inside of every
gland's outline, which also covers both sides of the line where two glands touch. Post-processing
(:func:`micronet_jax.postprocess.contour_to_instances`) then takes the gland interiors as seeds and
grows them back over the band with a watershed, so touching glands come out as separate objects
(the idea behind DCAN and MILD-Net's contour outputs, on Micro-Net's heads).

The band is built from the instance labels *after* the geometric augmentation (the sampler calls
:func:`class_map` on the warped crop), so its width in pixels is the same in every sample.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import disk
from skimage.segmentation import find_boundaries

from micronet_jax.config import check_target  # data.target's values and classes live in config.py

BACKGROUND, GLAND, BOUNDARY = 0, 1, 2


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Gland pixels within ``width`` px (chessboard) of another label: their own outline's inside.

    ``find_boundaries(mode="inner")`` marks the pixels of each object that touch a different label,
    background or another gland, so where two glands touch both sides are marked; growing that by
    ``width - 1`` px inside the glands gives a band ``width`` px wide.
    """
    label = np.asarray(label)
    if width < 1:
        raise ValueError(f"config data.boundary_width={width} must be >= 1")
    band = find_boundaries(label, connectivity=1, mode="inner") & (label > 0)
    if width > 1:
        band = ndimage.binary_dilation(band, iterations=width - 1) & (label > 0)
    return band


def widen_gaps(label: np.ndarray, width: int) -> np.ndarray:
    """The instance labels with every gland pixel within ``width`` px (Euclidean) of another gland
    turned to background: neighbouring glands then lie at least about ``width`` px apart.

    Why: in GlaS the background between neighbouring glands is often 1-2 px wide, less once
    ``data.scale`` halves the image. A two-class network does not reproduce such thin lines, and
    glands joined by them come out as one object. Trained on wider gaps it might keep them apart;
    in the CPU recipe at width 3 it did not (docs/accuracy.md, fifteenth round: as many merges).
    Glands further than ``width`` px from any other are unchanged, and only the sides that face a
    neighbour give up pixels. ``width`` 0 returns the labels as they are.

    A pixel of gland k is near another gland exactly when a disk of radius ``width`` around it holds
    another gland's id: then the disk's largest id is above k or its smallest gland id below k.
    """
    label = np.asarray(label)
    if width < 0:
        raise ValueError(f"config data.gap_width={width} must be >= 0")
    if width == 0 or label.max(initial=0) == 0:
        return label
    footprint = disk(int(width)).astype(bool)  # as postprocess's opening: x² + y² <= width²
    ids = label.astype(np.int64)
    largest = ndimage.grey_dilation(ids, footprint=footprint, mode="nearest")
    big = np.iinfo(np.int64).max
    smallest = ndimage.grey_erosion(np.where(ids > 0, ids, big), footprint=footprint, mode="nearest")
    near_other = (ids > 0) & ((largest != ids) | (smallest != ids))
    out = label.copy()
    out[near_other] = 0
    return out


def class_map(label: np.ndarray, target: str, boundary_width: int = 4) -> np.ndarray:
    """int32 (H, W) classes for the loss: 0/1 (``binary``) or 0/1/2 with the band (``contour``)."""
    check_target(target)
    classes = (np.asarray(label) > 0).astype(np.int32)
    if target == "contour":
        classes[boundary_band(label, boundary_width)] = BOUNDARY
    return classes
