"""Writers for whole-slide results: QuPath GeoJSON, the glands CSV, the overlay PNG, the probability OME-TIFF.

Why separate: these are the side effects at the edge of slide prediction (:mod:`micronet_jax.wsi`), and
each format has rules of its own that are easier to check in one place:

- GeoJSON as QuPath reads and writes it (``File > Import objects``, or drag and drop): a
  FeatureCollection of ``Polygon`` features in level-0 pixel coordinates (x right, y down; pixel (0, 0)
  is the square [0, 1) x [0, 1)), with ``properties.objectType`` ("detection" or "annotation"),
  ``properties.classification = {"name": "Gland", "color": [r, g, b]}`` and ``measurements``.
- The probability map as a tiled, pyramidal OME-TIFF (tifffile), 8-bit (p x 255), so QuPath, napari or
  any OME reader can open it without loading it whole.

Writers stream: one feature, one CSV row at a time, and the pyramid from a raw file on disk.
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import shapely
import shapely.affinity
from PIL import Image, ImageDraw
from shapely.geometry import MultiPolygon, Polygon

from micronet_jax.stitch import Gland

__all__ = ["GLAND_COLOUR", "gland_outputs", "FeatureCollectionWriter", "CSV_FIELDS", "Overlay",
           "write_probability_ome_tiff"]

GLAND_COLOUR = (0, 200, 0)  # QuPath class colour and overlay outline: green, as in visualize.py
CSV_FIELDS = ["id", "centroid_x_px", "centroid_y_px", "area_px", "area_um2", "perimeter_px",
              "perimeter_um", "mean_probability"]


def _valid(geom: Polygon | MultiPolygon) -> Polygon | MultiPolygon:
    """A valid geometry; simplification can (rarely) make a ring touch itself."""
    if geom.is_valid:
        return geom
    fixed = shapely.make_valid(geom)
    polys = [g for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, (Polygon, MultiPolygon))]
    parts = [p for g in polys for p in getattr(g, "geoms", [g])]
    if not parts:
        return geom
    return parts[0] if len(parts) == 1 else MultiPolygon(parts)


def gland_outputs(gland: Gland, k: float, mpp_model: float | None, simplify: float,
                  object_type: str, slide_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GeoJSON feature, CSV row) of one gland; ``k`` is level-0 px per model px.

    Areas and centroids come from the exact pixel-edge polygon (area = pixel count); the written
    polygon and the perimeter from its simplification (``simplify`` model px), which removes the pixel
    staircase that would otherwise lengthen the perimeter by up to 4/pi and the file several fold.
    """
    exact = gland.polygon
    shape = exact.simplify(simplify, preserve_topology=True) if simplify > 0 else exact
    shape = _valid(shapely.affinity.scale(shape, xfact=k, yfact=k, origin=(0, 0)))
    c = exact.centroid
    area0 = gland.area_px * k * k
    perim0 = shape.length
    row = {
        "id": gland.id,
        "centroid_x_px": round(c.x * k, 2),
        "centroid_y_px": round(c.y * k, 2),
        "area_px": round(area0, 2) if k != 1 else int(gland.area_px),
        "area_um2": round(gland.area_px * mpp_model ** 2, 3) if mpp_model else "",
        "perimeter_px": round(perim0, 2),
        "perimeter_um": round(perim0 / k * mpp_model, 3) if mpp_model else "",
        "mean_probability": round(gland.mean_probability, 4) if gland.prob_px else "",
    }
    geometry = json.loads(shapely.to_geojson(shapely.set_precision(shape, 0.001)))
    measurements = {"Area px": row["area_px"], "Perimeter px": row["perimeter_px"],
                    "Mean probability": row["mean_probability"] if gland.prob_px else None}
    if mpp_model:
        measurements.update({"Area um^2": row["area_um2"], "Perimeter um": row["perimeter_um"]})
    feature = {
        "type": "Feature",
        # A stable id per (slide, gland), so re-importing the same result does not duplicate objects.
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"micronet-jax/{slide_name}/{gland.id}")),
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "name": f"Gland {gland.id}",
            "classification": {"name": "Gland", "color": list(GLAND_COLOUR)},
            "isLocked": False,
            "measurements": measurements,
        },
    }
    return feature, row


class FeatureCollectionWriter:
    """Writes a GeoJSON FeatureCollection one feature at a time (a slide can hold 10^5 glands)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self._f: IO[str] = open(path, "w")
        self._f.write('{"type": "FeatureCollection", "features": [\n')
        self.count = 0

    def write(self, feature: dict[str, Any]) -> None:
        self._f.write((",\n" if self.count else "") + json.dumps(feature, separators=(",", ":")))
        self.count += 1

    def close(self) -> None:
        self._f.write("\n]}\n")
        self._f.close()


def csv_writer(f: IO[str]) -> csv.DictWriter:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    return writer


class Overlay:
    """The slide thumbnail with gland outlines drawn in green as glands are written (and the edge of
    the tissue mask in grey, so skipped glass is visible)."""

    def __init__(self, thumb: np.ndarray, thumb_k: float, tissue: np.ndarray | None = None) -> None:
        arr = np.array(thumb, np.uint8, copy=True)
        if tissue is not None and np.shape(tissue) == arr.shape[:2] and not np.all(tissue):
            from skimage.segmentation import find_boundaries

            arr[find_boundaries(np.asarray(tissue, bool), mode="inner")] = (128, 128, 128)
        self._img = Image.fromarray(arr)
        self._draw = ImageDraw.Draw(self._img)
        self.thumb_k = float(thumb_k)  # level-0 px per thumbnail px

    def add(self, polygon_model: Polygon | MultiPolygon, k: float) -> None:
        """Draws one gland given on the model grid (``k`` level-0 px per model px)."""
        s = k / self.thumb_k
        for part in getattr(polygon_model, "geoms", [polygon_model]):
            pts = [(x * s, y * s) for x, y in part.exterior.simplify(0.5 / s).coords]
            if len(pts) >= 2:
                self._draw.line(pts, fill=GLAND_COLOUR, width=1)

    def image(self) -> np.ndarray:
        return np.asarray(self._img)


def _strips(raw: Path, width: int, height: int, rows: int) -> Iterator[np.ndarray]:
    with open(raw, "rb") as f:
        for y in range(0, height, rows):
            n = min(rows, height - y)
            yield np.fromfile(f, np.uint8, count=n * width).reshape(n, width)


def _level_tiles(raw: Path, width: int, height: int, tile: int, next_raw: Path | None) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order from its raw file; writes the next level (2x2 mean) as it goes."""
    out = open(next_raw, "wb") if next_raw is not None else None
    try:
        for strip in _strips(raw, width, height, tile):
            if out is not None:
                h2, w2 = (strip.shape[0] + 1) // 2, (width + 1) // 2
                s = np.pad(strip, ((0, 2 * h2 - strip.shape[0]), (0, 2 * w2 - width)), mode="edge")
                half = s.reshape(h2, 2, w2, 2).astype(np.uint16).sum(axis=(1, 3))
                ((half + 2) // 4).astype(np.uint8).tofile(out)
            padded = np.zeros((tile, math.ceil(width / tile) * tile), np.uint8)
            padded[: strip.shape[0], :width] = strip
            for x in range(0, width, tile):
                yield padded[:, x:x + tile]
    finally:
        if out is not None:
            out.close()


def write_probability_ome_tiff(raw: str | os.PathLike, width: int, height: int, path: str | os.PathLike,
                               mpp: float | None, tile: int = 256) -> int:
    """Pyramidal, tiled, zlib-compressed OME-TIFF of the uint8 (height, width) map in ``raw``.

    Halves the size per level until it fits a tile. Returns the number of levels. ``raw`` and the
    intermediate level files are deleted.
    """
    import tifffile

    sizes = [(width, height)]
    while max(sizes[-1]) > tile:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    raws = [Path(raw)] + [Path(f"{raw}.level{i}") for i in range(1, len(sizes))]
    metadata: dict[str, Any] = {"axes": "YX", "Name": "p(gland) x 255"}
    if mpp:
        metadata.update({"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                         "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"})
    opts = dict(tile=(tile, tile), dtype=np.uint8, compression="zlib", photometric="minisblack")
    try:
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            for lv, (w, h) in enumerate(sizes):
                nxt = raws[lv + 1] if lv + 1 < len(sizes) else None
                tiles = _level_tiles(raws[lv], w, h, tile, nxt)
                if lv == 0:
                    tw.write(tiles, shape=(h, w), subifds=len(sizes) - 1, metadata=metadata, **opts)
                else:
                    tw.write(tiles, shape=(h, w), subfiletype=1, metadata=None, **opts)
    finally:
        for r in raws:
            if r.exists():
                r.unlink()
    return len(sizes)
