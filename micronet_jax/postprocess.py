"""Gland post-processing (spec §5): probability map -> instance label image, and its tuning.

Pipeline: ``p > threshold`` -> fill holes -> optional opening with a disk -> connected components,
or with ``split_distance`` > 0 a watershed that splits touching glands at their necks, or with
``split_threshold`` > 0 one seeded where p is high -> drop objects smaller than ``min_size``
(``border_min_size`` for objects that touch the image's frame, when set).
Components use 8-connectivity throughout (skimage's ``label`` default in 2-D), so size filtering and
labelling agree on what one object is.

:func:`tune_postprocess` grid-searches those constants on validation images only (spec §7.17). It labels
each (threshold, opening) once and derives every ``min_size`` from a component-size lookup, and it scores
candidates from one component x GT contingency matrix per image, so a grid costs little more than
one labelling per (threshold, opening).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import os
import sys
from typing import Any, NamedTuple, Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.morphology import disk, h_maxima
from skimage.segmentation import watershed

from micronet_jax.metrics import _as_label_image, _combine, _compact, _detection_and_dice, _f1

__all__ = ["contour_to_instances", "probability_to_instances", "tune_postprocess"]

_CONNECTIVITY = np.ones((3, 3), bool)  # 8-connectivity


def _binary_components(
    prob_fg: np.ndarray, threshold: float, fill_holes: bool, opening_radius: int,
    split_distance: float = 0.0, split_threshold: float = 0.0, surface: np.ndarray | None = None,
    min_marker_size: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 and labelling before size filtering; returns (labels, sizes indexed by label).

    ``split_distance`` > 0 replaces connected components by a watershed of the mask's distance
    transform seeded by its h-maxima of that height (px): two glands joined by a neck narrower than
    their bodies by at least that much become two objects. A two-class output cannot mark the border
    between touching glands, but their union is usually pinched there.

    ``split_threshold`` > 0 replaces them by a watershed on p(gland) instead (``surface``: p, maybe
    smoothed, see :func:`_smoothed`), seeded by its regions above that threshold of at least
    ``min_marker_size`` px: two glands whose probability dips between them, without falling below
    ``threshold``, become two objects. The weight map trains exactly such a dip at the gaps.
    """
    prob = np.asarray(prob_fg)
    if prob.ndim != 2:
        raise ValueError(f"prob_fg must be a 2-D (H, W) foreground probability map, got {prob.shape}")
    if opening_radius < 0:
        raise ValueError(f"opening_radius must be >= 0, got {opening_radius}")
    if split_distance < 0:
        raise ValueError(f"split_distance must be >= 0, got {split_distance}")
    if not 0.0 <= split_threshold <= 1.0:
        raise ValueError(f"split_threshold must be in [0, 1], got {split_threshold}")
    if split_distance > 0 and split_threshold > 0:
        raise ValueError(f"split_distance={split_distance} and split_threshold={split_threshold}: "
                         "choose one way to split touching glands (the other 0)")
    mask = prob > threshold  # strict, so 0.5 equals argmax of a 2-class softmax (ties -> background)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if opening_radius > 0:
        mask = ndimage.binary_opening(mask, structure=disk(int(opening_radius)).astype(bool))
    if split_distance > 0 and mask.any():
        distance = ndimage.distance_transform_edt(mask)
        markers, _ = ndimage.label(h_maxima(distance, float(split_distance)), structure=_CONNECTIVITY)
        return _watershed(-distance, markers, mask)
    if split_threshold > 0 and mask.any():
        return _seeded_watershed(prob if surface is None else surface, mask, float(split_threshold),
                                 int(min_marker_size))
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    return labels, sizes


def _watershed(surface: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marker-controlled watershed of ``surface`` over ``mask``; (labels 0..n, sizes indexed by label).

    A part of the mask that no marker reaches (a gland without a seed) stays an object of its own
    instead of vanishing.
    """
    orphans, _ = ndimage.label(mask & ~ndimage.binary_propagation(markers > 0, mask=mask),
                               structure=_CONNECTIVITY)
    markers = np.where(orphans > 0, orphans + int(markers.max()), markers)
    labels = watershed(surface, markers, mask=mask, connectivity=2)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(mask.shape).astype(np.int32)
    return labels, np.bincount(labels.ravel())


def _seeded_watershed(surface: np.ndarray, mask: np.ndarray, marker_threshold: float,
                      min_marker_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeds are the connected regions of ``surface`` > ``marker_threshold`` inside ``mask`` with at
    least ``min_marker_size`` px; each grows over the mask on -``surface``, so basins meet where the
    surface is lowest (between touching glands). Returns (labels, sizes indexed by label)."""
    seeds = (surface > marker_threshold) & mask
    markers, n = ndimage.label(seeds, structure=_CONNECTIVITY)
    if n and min_marker_size > 0:
        small = np.bincount(markers.ravel(), minlength=n + 1) < min_marker_size
        small[0] = False
        markers[small[markers]] = 0
    return _watershed(-surface, markers, mask)


def _frame_touching(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Boolean per label 0..n_labels-1: does the object reach the first or last row or column?"""
    touching = np.zeros(n_labels, bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        touching[edge] = True
    return touching


def _keep_by_size(sizes: np.ndarray, min_size: int, touching: np.ndarray | None,
                  border_min_size: int | None) -> np.ndarray:
    """Which labels survive the size filter (label 0, the background, included as False).

    A gland cut by the image's frame keeps only the part inside it, often a sliver smaller than any
    whole gland, yet GlaS counts it as an object. ``border_min_size`` (None: ``min_size``) is the
    least size of objects touching the frame, so a ``min_size`` large enough to drop small false
    objects in the stroma need not drop those slivers too.
    """
    keep = sizes >= min_size
    if border_min_size is not None and touching is not None:
        keep = np.where(touching, sizes >= int(border_min_size), keep)
    keep[0] = False
    return keep


def _size_filter_lut(labels: np.ndarray, sizes: np.ndarray, min_size: int,
                     border_min_size: int | None = None) -> np.ndarray:
    """Lookup table: old label -> new consecutive label (0 for removed/background)."""
    touching = None
    if border_min_size is not None:
        if border_min_size < 0:
            raise ValueError(f"border_min_size must be >= 0, got {border_min_size}")
        touching = _frame_touching(labels, sizes.size)
    keep = _keep_by_size(sizes, min_size, touching, border_min_size)
    lut = np.zeros(sizes.size, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut


def probability_to_instances(
    prob_fg: np.ndarray,
    threshold: float = 0.5,
    fill_holes: bool = True,
    opening_radius: int = 0,
    min_size: int = 300,
    split_distance: float = 0.0,
    border_min_size: int | None = None,
    split_threshold: float = 0.0,
    marker_sigma: float = 0.0,
    min_marker_size: int = 0,
) -> np.ndarray:
    """Foreground probability (H, W) -> int32 instance labels 1..n (0 = background).

    Objects with fewer than ``min_size`` pixels are removed (size counted after fill/opening and the
    optional ``split_distance`` or ``split_threshold`` watershed, see :func:`_binary_components`;
    ``marker_sigma`` and ``min_marker_size`` shape the latter's seeds as for the contour target);
    objects that touch the image's frame are removed below ``border_min_size`` instead, when given.
    """
    surface = _smoothed(np.asarray(prob_fg), float(marker_sigma)) if split_threshold > 0 else None
    labels, sizes = _binary_components(prob_fg, threshold, fill_holes, opening_radius, float(split_distance),
                                       float(split_threshold), surface, int(min_marker_size))
    return _size_filter_lut(labels, sizes, int(min_size), border_min_size)[labels]


def _marker_surface(prob: np.ndarray, marker_sigma: float) -> np.ndarray:
    """p(interior) of a 3-class map, Gaussian-smoothed by ``marker_sigma`` px when > 0.

    A noisy interior map breaks one gland into several seeds; smoothing it first (seeds and watershed
    surface alike) keeps one seed per gland without moving the mask's outline. Depends on the image
    only, so the tuner computes it once per image, not once per grid point.
    """
    if prob.ndim != 3 or prob.shape[-1] != 3:
        raise ValueError(f"need (H, W, 3) background/interior/boundary probabilities, got {prob.shape}")
    return _smoothed(prob[..., 1], marker_sigma)


def _smoothed(prob: np.ndarray, sigma: float) -> np.ndarray:
    """``prob`` Gaussian-smoothed by ``sigma`` px (unchanged at 0): the watershed's seeds and surface."""
    if sigma < 0:
        raise ValueError(f"marker_sigma must be >= 0, got {sigma}")
    return ndimage.gaussian_filter(prob.astype(np.float32), float(sigma)) if sigma > 0 else prob


def _merge_weak_borders(labels: np.ndarray, sizes: np.ndarray, boundary: np.ndarray,
                        merge_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Joins touching objects whose shared border has a mean p(boundary) below ``merge_threshold``.

    Two glands that touch are split by the watershed along the boundary band the model predicts
    between them; a large gland whose interior map dips is cut as well, but along pixels the model
    calls interior, not boundary. The mean p(boundary) over the pixel pairs that straddle a border
    is meant to tell the two apart (on the CPU recipe's models it did not, well enough to gain F1:
    docs/accuracy.md, sixteenth round). Takes and returns (labels 0..n, sizes indexed by label),
    unchanged when no border is weak.
    """
    n = sizes.size - 1
    lo_parts, hi_parts, value_parts = [], [], []
    for a, b, va, vb in ((labels[:, :-1], labels[:, 1:], boundary[:, :-1], boundary[:, 1:]),
                         (labels[:-1], labels[1:], boundary[:-1], boundary[1:])):
        straddle = (a != b) & (a > 0) & (b > 0)
        lo_parts.append(np.minimum(a[straddle], b[straddle]).astype(np.int64))
        hi_parts.append(np.maximum(a[straddle], b[straddle]).astype(np.int64))
        value_parts.append(0.5 * (va[straddle].astype(np.float64) + vb[straddle]))
    # One entry per touching pair (not an (n+1)^2 table: a noisy map can hold thousands of objects).
    pairs, which = np.unique(np.concatenate(lo_parts) * (n + 1) + np.concatenate(hi_parts),
                             return_inverse=True)
    total = np.bincount(which.ravel(), weights=np.concatenate(value_parts), minlength=pairs.size)
    weak = pairs[total < merge_threshold * np.bincount(which.ravel(), minlength=pairs.size)]
    if not weak.size:
        return labels, sizes
    graph = coo_matrix((np.ones(weak.size), (weak // (n + 1), weak % (n + 1))), shape=(n + 1, n + 1))
    _, component = connected_components(graph, directed=False)
    # Background (label 0) has no edges, so it is a component of its own; it goes back to 0.
    _, lut = np.unique(np.where(component == component[0], -1, component), return_inverse=True)
    merged = lut.astype(np.int32)[labels]
    return merged, np.bincount(merged.ravel())


def _contour_components(
    prob: np.ndarray, interior: np.ndarray, threshold: float, marker_threshold: float,
    min_marker_size: int, fill_holes: bool, opening_radius: int, merge_threshold: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Marker-controlled watershed of a 3-class map, seeded and flooded on ``interior``
    (:func:`_marker_surface`), then objects joined across weak borders (:func:`_merge_weak_borders`,
    when ``merge_threshold`` > 0); returns (labels, sizes indexed by label)."""
    mask = (prob[..., 1] + prob[..., 2]) > threshold
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if opening_radius > 0:
        mask = ndimage.binary_opening(mask, structure=disk(int(opening_radius)).astype(bool))
    # Flood from the seeds over -p(interior): basins meet where the interior probability is lowest,
    # i.e. on the boundary band between touching glands.
    labels, sizes = _seeded_watershed(interior, mask, marker_threshold, min_marker_size)
    if merge_threshold > 0:
        labels, sizes = _merge_weak_borders(labels, sizes, prob[..., 2], float(merge_threshold))
    return labels, sizes


def contour_to_instances(
    prob: np.ndarray,
    threshold: float = 0.5,
    marker_threshold: float = 0.5,
    min_marker_size: int = 30,
    fill_holes: bool = True,
    opening_radius: int = 0,
    min_size: int = 300,
    marker_sigma: float = 0.0,
    border_min_size: int | None = None,
    merge_threshold: float = 0.0,
) -> np.ndarray:
    """Background/interior/boundary probabilities (H, W, 3) -> int32 instance labels (``data.target=contour``).

    The gland mask is p(interior) + p(boundary) > ``threshold`` (holes filled, optional opening);
    connected regions of p(interior) > ``marker_threshold`` of at least ``min_marker_size`` px are the
    seeds; a watershed on -p(interior) grows each seed over the mask, so two touching glands split
    along their shared boundary band. Objects under ``min_size`` px (``border_min_size`` for those
    touching the image's frame, when given) are then removed. With ``marker_sigma`` > 0, p(interior)
    is first smoothed by a Gaussian of that many px (seeds and watershed surface; the mask is not).
    With ``merge_threshold`` > 0, objects the watershed split along a border whose mean p(boundary)
    is below it are joined again before the size filter (:func:`_merge_weak_borders`).
    """
    prob = np.asarray(prob)
    if not 0.0 <= merge_threshold <= 1.0:
        raise ValueError(f"merge_threshold must be in [0, 1], got {merge_threshold}")
    labels, sizes = _contour_components(
        prob, _marker_surface(prob, float(marker_sigma)), threshold, marker_threshold,
        int(min_marker_size), fill_holes, int(opening_radius), float(merge_threshold),
    )
    return _size_filter_lut(labels, sizes, int(min_size), border_min_size)[labels]


def tune_postprocess(
    prob_maps: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    thresholds: Sequence[float],
    min_sizes: Sequence[int],
    opening_radii: Sequence[int] = (0,),
    fill_holes: bool = True,
    marker_thresholds: Sequence[float] = (0.5,),
    min_marker_size: int = 30,
    split_distances: Sequence[float] = (0.0,),
    marker_sigma: float = 0.0,
    workers: int | None = 1,
    border_min_sizes: Sequence[int | None] = (None,),
    merge_threshold: float = 0.0,
    split_thresholds: Sequence[float] = (0.0,),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Grid search of post-processing constants by pooled object F1, ties broken by pooled Object Dice.

    ``prob_maps`` are either foreground maps (H, W) for :func:`probability_to_instances`, or 3-class
    maps (H, W, 3) for :func:`contour_to_instances`, where ``marker_thresholds`` is searched too;
    for foreground maps the third axis is ``split_distances`` (0 = connected components), or
    ``split_thresholds`` when any of them is > 0 (0 = connected components again; then
    ``split_distances`` must be 0 only: one way to split touching glands at a time).
    ``border_min_sizes`` is the least size of objects touching the image's frame (None: ``min_size``,
    as without the key, and reported as that number; see :func:`_keep_by_size`), searched as the
    innermost axis. ``merge_threshold`` (contour maps) is held fixed, like ``marker_sigma`` and
    ``min_marker_size`` (the seeds' smoothing and least size, for contour maps and split thresholds).

    Use validation images only. Returns ``(best, rows)``: ``best`` holds only keyword arguments of
    :func:`probability_to_instances` (so ``probability_to_instances(p, **best)`` reproduces it), and
    ``rows`` has one dict per grid point (params + ``f1, object_dice, tp, fp, fn``) in grid order
    (threshold, opening_radius, marker_threshold / split_distance / split_threshold, min_size,
    border_min_size).
    Remaining ties keep the first grid point. Hausdorff is not computed here: it does not enter the
    selection and is the expensive part.

    ``workers`` > 1 labels the (threshold, opening, third axis) points in that many processes
    (``None``: one per available core, or in-process when the grid is small); the rows are the same
    as with 1. Why: on a GPU host the grid ran on one of 16 cores for a third of the speedrun.
    """
    prob_maps, gt_labels = list(prob_maps), list(gt_labels)
    if len(prob_maps) != len(gt_labels):
        raise ValueError(f"got {len(prob_maps)} probability maps but {len(gt_labels)} GT images")
    if not prob_maps:
        raise ValueError("tune_postprocess needs at least one image")
    if not (len(thresholds) and len(min_sizes) and len(opening_radii) and len(border_min_sizes)):
        raise ValueError("thresholds, min_sizes, opening_radii and border_min_sizes must each be non-empty")
    if any(b is not None and b < 0 for b in border_min_sizes):
        raise ValueError(f"border_min_sizes must be >= 0 or None, got {tuple(border_min_sizes)}")

    gts = []
    for k, (p, g) in enumerate(zip(prob_maps, gt_labels)):
        g = _as_label_image(g, f"gt_labels[{k}]")
        if np.shape(p)[:2] != g.shape:
            raise ValueError(f"image {k}: probability shape {np.shape(p)} != GT shape {g.shape}")
        g_c, _ = _compact(g)
        gts.append((g_c, int(g_c.max()) if g_c.size else 0))

    contour = np.ndim(prob_maps[0]) == 3
    if any(not 0.0 <= float(t) <= 1.0 for t in split_thresholds):
        raise ValueError(f"split_thresholds must be in [0, 1], got {tuple(split_thresholds)}")
    seeded = not contour and any(float(t) > 0 for t in split_thresholds)
    if seeded and any(float(d) > 0 for d in split_distances):
        raise ValueError(f"split_thresholds={tuple(split_thresholds)} need split_distances=(0,), got "
                         f"{tuple(split_distances)}: one way to split touching glands at a time")
    if contour:
        prob_maps = [np.asarray(p) for p in prob_maps]
        surfaces = [_marker_surface(p, float(marker_sigma)) for p in prob_maps]
    elif seeded:
        prob_maps = [np.asarray(p) for p in prob_maps]
        surfaces = [_smoothed(p, float(marker_sigma)) for p in prob_maps]
    else:
        surfaces = [None] * len(prob_maps)
    # The third axis of the grid: the watershed's seed threshold (contour), or for two classes the
    # seed threshold on p(gland) (seeded) or the neck split.
    if contour:
        third = tuple(marker_thresholds)
    elif seeded:
        third = tuple(float(t) for t in split_thresholds)
    else:
        third = tuple(float(d) for d in split_distances)
    if not third:
        raise ValueError("marker_thresholds / split_distances must be non-empty")
    rows: list[dict[str, Any]] = []
    points = list(itertools.product(thresholds, opening_radii, third))
    state = _GridInputs(prob_maps, surfaces, gts, contour, int(min_marker_size), bool(fill_holes),
                        float(merge_threshold), seeded)
    for (thr, rad, mthr), per_image in zip(points, _map_grid(state, points, workers)):
        for ms, bms in itertools.product(min_sizes, border_min_sizes):
            tot = dict(tp=0, fp=0, fn=0, s_dice=0.0, s_area=0, g_dice=0.0, g_area=0)
            for cont, sizes, touching in per_image:
                keep = _keep_by_size(sizes, ms, touching, bms)
                keep[0] = True  # background row; removed objects' pixels join it
                c = cont[keep].copy()
                c[0] += cont[~keep].sum(axis=0)
                d = _detection_and_dice(c, "default", "strict")
                tot["tp"] += d["tp"]
                tot["fp"] += d["fp"]
                tot["fn"] += d["fn"]
                tot["s_dice"] += d["s_dice_sum"]
                tot["g_dice"] += d["g_dice_sum"]
                tot["s_area"] += int(d["s_area"].sum())
                tot["g_area"] += int(d["g_area"].sum())
            rows.append({
                **({"marker_threshold": float(mthr), "min_marker_size": int(min_marker_size),
                    "marker_sigma": float(marker_sigma), "merge_threshold": float(merge_threshold)}
                   if contour else {"split_distance": 0.0 if seeded else float(mthr),
                                    "split_threshold": float(mthr) if seeded else 0.0,
                                    **({"min_marker_size": int(min_marker_size),
                                        "marker_sigma": float(marker_sigma)} if seeded else {})}),
                "threshold": float(thr),
                "opening_radius": int(rad),
                "min_size": int(ms),
                # None filters the frame at min_size: written so, the row's flags carry it explicitly
                # and override a config whose own border_min_size differs.
                "border_min_size": int(ms) if bms is None else int(bms),
                "fill_holes": bool(fill_holes),
                "f1": _f1(tot["tp"], tot["fp"], tot["fn"]),
                "object_dice": _combine(tot["s_dice"], tot["s_area"], tot["g_dice"], tot["g_area"],
                                        hausdorff=False),
                "tp": tot["tp"],
                "fp": tot["fp"],
                "fn": tot["fn"],
            })
    best_row = max(enumerate(rows), key=lambda t: (t[1]["f1"], t[1]["object_dice"], -t[0]))[1]
    keys = ("threshold", "fill_holes", "opening_radius", "min_size", "border_min_size")
    keys += ("marker_threshold", "min_marker_size", "marker_sigma", "merge_threshold") if contour \
        else ("split_distance", "split_threshold") + (("min_marker_size", "marker_sigma") if seeded else ())
    best = {k: best_row[k] for k in keys}
    return best, rows


class _GridInputs(NamedTuple):
    """What every grid point of :func:`tune_postprocess` reads; sent once to each worker process."""

    prob_maps: list  # (H, W) foreground or (H, W, 3) contour maps
    surfaces: list  # per image: the smoothed p(interior) (contour), p(gland) (seeded) or None
    gts: list  # per image: (compact GT labels, number of GT objects)
    contour: bool
    min_marker_size: int
    fill_holes: bool
    merge_threshold: float = 0.0
    seeded: bool = False  # two classes: the third axis is split_threshold, not split_distance


def _grid_point(state: _GridInputs, point: tuple[float, int, float]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image, the component x GT contingency, the component sizes and which components touch the
    image's frame, at one grid point.

    Each ``min_size`` of the grid then only drops rows of these (:func:`tune_postprocess`)."""
    thr, rad, third = point
    per_image = []
    for p, surface, (g_c, n_g) in zip(state.prob_maps, state.surfaces, state.gts):
        if state.contour:
            labels, sizes = _contour_components(p, surface, thr, third, state.min_marker_size,
                                                state.fill_holes, int(rad), state.merge_threshold)
        else:
            distance, split = (0.0, third) if state.seeded else (third, 0.0)
            labels, sizes = _binary_components(p, thr, state.fill_holes, int(rad), distance, split,
                                               surface, state.min_marker_size)
        n_c = sizes.size - 1
        idx = labels.ravel().astype(np.intp) * (n_g + 1) + g_c.ravel()
        cont = np.bincount(idx, minlength=(n_c + 1) * (n_g + 1)).reshape(n_c + 1, n_g + 1)
        per_image.append((cont, sizes, _frame_touching(labels, sizes.size)))
    return per_image


_WORKER_STATE: _GridInputs | None = None  # Set in each worker process by _init_worker.


def _init_worker(state: _GridInputs) -> None:
    global _WORKER_STATE
    _WORKER_STATE = state


def _worker_grid_point(point: tuple[float, int, float]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return _grid_point(_WORKER_STATE, point)


def _spawn_can_start_main() -> bool:
    """Whether spawned workers can start without running the caller's script again.

    A spawned worker re-imports ``__main__``: harmless for a module run with ``python -m`` (the
    command line) or a session without a script file (``python -c``, a notebook), but a plain script
    would run again in every worker (and an unguarded one then hangs the pool, seen with a script
    that called this at its top level). Such callers get the grid in-process."""
    main = sys.modules.get("__main__")
    return getattr(main, "__spec__", None) is not None or not getattr(main, "__file__", None)


# Below this many pixel-labellings (grid points x pixels) a pool's start-up (a second or two per
# process) costs more than it saves: tests and small crops stay in-process.
_PARALLEL_MIN_WORK = 5e7


def _map_grid(state: _GridInputs, points: list, workers: int | None):
    """:func:`_grid_point` over ``points``, in order, in-process or in a pool of ``workers``."""
    if workers is None:
        pixels = sum(int(np.prod(np.shape(p)[:2])) for p in state.prob_maps)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = 1 if len(points) * pixels < _PARALLEL_MIN_WORK else int(cores or 1)
    workers = max(1, min(int(workers), len(points)))
    if workers == 1 or not _spawn_can_start_main():
        return [_grid_point(state, point) for point in points]
    # spawn, not fork: the caller runs JAX, whose threads a forked child must not inherit.
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                    initializer=_init_worker, initargs=(state,)) as pool:
            return list(pool.map(_worker_grid_point, points))
    except (OSError, concurrent.futures.process.BrokenProcessPool) as e:  # No processes here.
        logging.warning("post-processing tuning: %d worker processes failed (%s); "
                        "running the grid in this process", workers, e)
        return [_grid_point(state, point) for point in points]
