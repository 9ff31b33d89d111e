"""Gland instances from a probability map that arrives one region at a time: whole glands, each once.

Why: a slide's probability map never exists in memory whole, but the gland post-processing of spec §5
(threshold, fill holes, opening, minimum size, 8-connected components) is defined on the whole map.
:class:`GlandStitcher` reproduces it region by region:

- each region is thresholded, its holes filled and its components labelled on its own;
- a component that touches no inner region border is complete: it is emitted at once;
- one that touches an inner border becomes a *piece*, with an exact pixel-edge polygon in slide (model
  grid) coordinates. Pieces that are 8-connected across a border are joined (union-find over the
  border rows and columns of neighbouring regions), and when the slide is done each group is merged
  into one gland: polygons unioned, pixel counts and probability sums added, then the holes that only
  closed across a border are filled and the minimum size applied to the whole gland.

So a gland comes out once and whole whatever the region size, and its pixel count equals the one the
in-memory post-processing gives. Two approximations remain and are stated where they arise: the opening
(``opening_radius > 0``, off by default) is applied per region, and a hole that closes only across a
border is filled in the polygon and the area but its pixels' probabilities are not in the mean.

Regions are given in bands (rows of regions with the same vertical extent), top to bottom, left to right
within a band; regions that are skipped (no tissue) are simply not given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon
from skimage.morphology import disk

__all__ = ["Gland", "GlandStitcher", "component_polygons"]

_CONNECTIVITY = np.ones((3, 3), bool)  # 8-connectivity, as in postprocess.py


@dataclass
class Gland:
    """One gland on the model grid. ``polygon`` has pixel-edge coordinates (pixel (r, c) is the unit
    square [c, c+1) x [r, r+1)), so its area is the pixel count before any simplification."""

    id: int
    polygon: Polygon | MultiPolygon
    area_px: int  # model-grid pixels, holes filled
    prob_sum: float  # sum of p(gland) over the pixels whose probability is known
    prob_px: int  # how many pixels that sum covers

    @property
    def mean_probability(self) -> float:
        return self.prob_sum / self.prob_px if self.prob_px else float("nan")


# Half-side of the square that joins two pixels touching only at a corner (see _union).
_LINK = 1e-3


def _union(polys) -> Polygon | MultiPolygon:
    """One polygon from non-overlapping pixel pieces of one 8-connected object.

    Pieces sharing (parts of) edges merge in the union. Pixels that touch only at a corner would stay
    separate parts (a MultiPolygon, and a hole they enclose together would not be a hole of either), so
    each such corner gets a tiny square (area 4e-6 px) that joins them: the object becomes the single
    polygon, holes included, that its 8-connected pixels describe. (shapely's coverage union would be
    faster but needs identical vertices on shared edges, which pixel runs of different lengths lack.)
    """
    geom = shapely.union_all(np.asarray(polys, dtype=object))
    if not isinstance(geom, MultiPolygon):
        return geom
    parts = np.asarray(geom.geoms, dtype=object)
    tree = shapely.STRtree(parts)
    i, j = tree.query(parts, predicate="touches")
    keep = i < j
    corners = shapely.get_coordinates(shapely.intersection(parts[i[keep]], parts[j[keep]]))
    if not len(corners):
        return geom
    links = shapely.box(corners[:, 0] - _LINK, corners[:, 1] - _LINK, corners[:, 0] + _LINK, corners[:, 1] + _LINK)
    return shapely.union_all(np.concatenate([parts, links]))


def component_polygons(labels: np.ndarray, ids, x0: int = 0, y0: int = 0) -> dict[int, Polygon | MultiPolygon]:
    """Exact pixel-edge polygon (holes kept) of each label in ``ids``, offset by (x0, y0).

    Built as the union of the label's horizontal pixel runs, one box each: exact by construction and
    cheap (a gland has a few hundred runs).
    """
    out = {}
    slices = ndimage.find_objects(labels)
    for lab in ids:
        sl = slices[int(lab) - 1]
        sub = labels[sl] == lab
        edges = np.diff(np.pad(sub, ((0, 0), (1, 1))).astype(np.int8), axis=1)
        rows, starts = np.nonzero(edges == 1)
        _, ends = np.nonzero(edges == -1)  # same row-major order as the starts
        oy, ox = y0 + sl[0].start, x0 + sl[1].start
        boxes = shapely.box(ox + starts, oy + rows, ox + ends, oy + rows + 1)
        out[int(lab)] = _union(boxes)
    return out


def _fill_polygon_holes(geom: Polygon | MultiPolygon) -> tuple[Polygon | MultiPolygon, float]:
    """The geometry without interior rings, and the area those rings enclosed."""
    parts = list(geom.geoms) if isinstance(geom, MultiPolygon) else [geom]
    filled = [Polygon(p.exterior) for p in parts]
    added = sum(f.area - p.area for f, p in zip(filled, parts))
    return (filled[0] if len(filled) == 1 else MultiPolygon(filled)), added


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def add(self, a: int) -> None:
        self.parent[a] = a

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Unique (a, b) id pairs where both are pieces (> 0)."""
    ok = (a > 0) & (b > 0)
    if not ok.any():
        return np.zeros((0, 2), np.int64)
    return np.unique(np.stack([a[ok], b[ok]], 1).astype(np.int64), axis=0)


class GlandStitcher:
    """Region-by-region gland post-processing over a ``height`` x ``width`` model grid (see module doc)."""

    def __init__(self, height: int, width: int, *, threshold: float = 0.5, fill_holes: bool = True,
                 opening_radius: int = 0, min_size: int = 300) -> None:
        self.height, self.width = int(height), int(width)
        self.threshold, self.fill_holes = float(threshold), bool(fill_holes)
        self.opening_radius, self.min_size = int(opening_radius), int(min_size)
        self._pieces: dict[int, Gland] = {}
        self._uf = _UnionFind()
        self._next = 1
        self._band: tuple[int, int] | None = None
        self._prev_bottom = np.zeros(self.width, np.int64)  # piece ids on the last row of the band above
        self._prev_band_end = -1
        self._cur_bottom = np.zeros(self.width, np.int64)
        self._left: tuple[int, np.ndarray] | None = None  # (x1, right column) of the previous region
        # Glands already returned: (id, representative x, y, probability sum, pixels). A gland that
        # lies in a hole which only closes across a border belongs to the gland around it (fill holes
        # fills it in), which is known only at the end; see finish.
        self._emitted: list[tuple[int, float, float, float, int]] = []
        self._gland_ids = 0

    def _new_id(self) -> int:
        self._gland_ids += 1
        return self._gland_ids

    def add_region(self, y0: int, x0: int, prob: np.ndarray) -> list[Gland]:
        """Adds the gland probability of model-grid rows [y0, y0+h), cols [x0, x0+w); returns the glands
        completed inside it (those touching an inner border wait for :meth:`finish`)."""
        prob = np.asarray(prob, np.float32)
        h, w = prob.shape
        y1, x1 = y0 + h, x0 + w
        if y0 < 0 or x0 < 0 or y1 > self.height or x1 > self.width:
            raise ValueError(f"region rows {y0}:{y1} cols {x0}:{x1} leave the {self.height}x{self.width} grid")
        if self._band != (y0, y1):
            if self._band is not None and self._band[0] > y0:
                raise ValueError("regions must come in bands, top to bottom")
            self._prev_bottom = self._cur_bottom if self._band is not None and self._band[1] == y0 \
                else np.zeros(self.width, np.int64)
            self._cur_bottom = np.zeros(self.width, np.int64)
            self._band, self._left = (y0, y1), None

        mask = prob > self.threshold  # strict, as postprocess.probability_to_instances
        if self.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        if self.opening_radius > 0:  # per region: the one approximation at borders (module doc)
            mask = ndimage.binary_opening(mask, structure=disk(self.opening_radius).astype(bool))
        labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        sums = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n + 1)

        inner = []
        if y0 > 0:
            inner.append(labels[0])
        if y1 < self.height:
            inner.append(labels[-1])
        if x0 > 0:
            inner.append(labels[:, 0])
        if x1 < self.width:
            inner.append(labels[:, -1])
        open_ids = np.unique(np.concatenate(inner)) if inner else np.zeros(0, labels.dtype)
        open_ids = open_ids[open_ids > 0]
        is_open = np.zeros(n + 1, bool)
        is_open[open_ids] = True
        done_ids = [i for i in range(1, n + 1) if not is_open[i] and counts[i] >= self.min_size]

        wanted = done_ids + [int(i) for i in open_ids]
        polys = component_polygons(labels, wanted, x0, y0) if wanted else {}
        done = []
        for i in done_ids:
            g = Gland(self._new_id(), polys[i], int(counts[i]), float(sums[i]), int(counts[i]))
            rp = g.polygon.representative_point()
            self._emitted.append((g.id, rp.x, rp.y, g.prob_sum, g.prob_px))
            done.append(g)

        lut = np.zeros(n + 1, np.int64)  # local label -> global piece id (0: none)
        for i in open_ids:
            pid = self._next
            self._next += 1
            lut[i] = pid
            self._pieces[pid] = Gland(pid, polys[int(i)], int(counts[i]), float(sums[i]), int(counts[i]))
            self._uf.add(pid)

        top, bottom, left, right = lut[labels[0]], lut[labels[-1]], lut[labels[:, 0]], lut[labels[:, -1]]
        # 8-connected across the top border: x -> x-1, x, x+1 on the band above (full width, so region
        # corners are covered too).
        if y0 > 0:
            xs = np.arange(x0, x1)
            for d in (-1, 0, 1):
                nx = xs + d
                ok = (nx >= 0) & (nx < self.width)
                for a, b in _pairs(top[ok], self._prev_bottom[nx[ok]]):
                    self._uf.union(int(a), int(b))
        # ... and across the left border, within the band.
        if self._left is not None and self._left[0] == x0:
            prev_right = self._left[1]
            for d in (-1, 0, 1):
                lo, hi = max(0, -d), min(h, h - d)
                for a, b in _pairs(left[lo:hi], prev_right[lo + d:hi + d]):
                    self._uf.union(int(a), int(b))
        self._cur_bottom[x0:x1] = bottom
        self._left = (x1, right)
        return done

    def finish(self) -> tuple[list[Gland], set[int]]:
        """Merges the pieces that met across borders.

        Returns the glands that crossed borders, and the ids of earlier-returned glands that turned out
        to lie in a hole of one of them: hole filling makes those part of the gland around them (their
        pixels are already in its area and their probabilities are added to it), so drop them.
        """
        groups: dict[int, list[int]] = {}
        for pid in self._pieces:
            groups.setdefault(self._uf.find(pid), []).append(pid)
        merged = []
        for root in sorted(groups):
            parts = [self._pieces[p] for p in groups[root]]
            geom = _union([p.polygon for p in parts])
            area = sum(p.area_px for p in parts)
            holes = []
            if self.fill_holes:
                holes = [Polygon(r) for g in getattr(geom, "geoms", [geom]) for r in g.interiors]
                geom, added = _fill_polygon_holes(geom)
                area += int(round(added))
            merged.append([Gland(0, geom, area, sum(p.prob_sum for p in parts), sum(p.prob_px for p in parts)),
                           holes, geom.representative_point()])
        merged.sort(key=lambda m: -m[0].area_px)  # an enclosing gland is larger than what it encloses
        absorbed: set[int] = set()
        gone = [False] * len(merged)
        emitted = np.asarray([e[1:] for e in self._emitted], np.float64).reshape(-1, 4)
        taken = np.zeros(len(emitted), bool)
        out = []
        for k, (gland, holes, _) in enumerate(merged):
            if gone[k]:
                continue
            for hole in holes:
                inside = shapely.contains_xy(hole, emitted[:, 0], emitted[:, 1]) & ~taken
                for e in np.nonzero(inside)[0]:
                    taken[e] = True
                    absorbed.add(self._emitted[e][0])
                    gland.prob_sum += emitted[e, 2]
                    gland.prob_px += int(emitted[e, 3])
                for m in range(k + 1, len(merged)):
                    if not gone[m] and hole.contains(merged[m][2]):
                        gone[m] = True
                        gland.prob_sum += merged[m][0].prob_sum
                        gland.prob_px += merged[m][0].prob_px
            if gland.area_px >= self.min_size:
                gland.id = self._new_id()
                out.append(gland)
        self._pieces.clear()
        self._uf = _UnionFind()
        return out, absorbed
