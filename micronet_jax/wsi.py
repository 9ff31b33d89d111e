"""Whole-slide gland prediction in bounded memory: regions -> tiles -> probabilities -> whole glands -> files.

Why it is built this way:

- **One tile grid for the whole slide.** Tiles are laid out on the slide's model grid exactly as
  :func:`micronet_jax.infer.tiled_predict` lays them out on an image (reflect padding of ``margin``,
  stride ``tile - 2*margin``, centres kept), and a region is a block of whole tiles of that grid. Each
  output pixel therefore comes from the same tile, at the same position in it, as when the slide is
  predicted in memory as one image: there are no region seams in the probability map, and no tile is
  computed twice.
- **Whole glands, once.** Regions go through :class:`micronet_jax.stitch.GlandStitcher`, which joins
  glands across region borders and reproduces the in-memory post-processing (spec §5).
- **Bounded memory.** One region is in memory at a time (two while the next one is computed); glands
  are spooled to disk as they are completed, and outputs are written from the spool, so peak memory is
  set by ``eval.region_size``, not by the slide.
- **Glass is skipped.** Tiles whose kept centre has no tissue in the low-resolution tissue mask are not
  run (their probability is 0).
- **The device stays busy.** A region's tile batches are dispatched (JAX runs them asynchronously)
  before the previous region is post-processed, so reading and post-processing overlap the forward.

Standardisation uses one (mean, std) per slide, from its tissue (:func:`slide.normalization_stats`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np
import shapely
import shapely.affinity
from tqdm.auto import tqdm

from micronet_jax import export, infer, slide as slides, visualize
from micronet_jax.data.readers import DataError
from micronet_jax.inputs import standardize_with
from micronet_jax.stitch import Gland, GlandStitcher

logger = logging.getLogger(__name__)

__all__ = ["AxisPlan", "axis_plan", "region_blocks", "predict_slide", "check_output_dir"]


@dataclass(frozen=True)
class AxisPlan:
    """Tile layout along one axis of the model grid, identical to ``infer.tiled_predict``'s."""

    pad: int  # padding before the first pixel
    positions: tuple[int, ...]  # tile starts, padded coordinates
    intervals: tuple[tuple[int, int], ...]  # what each tile writes, padded coordinates

    def kept(self, i: int, length: int) -> tuple[int, int]:
        """The unpadded pixels [lo, hi) that tile ``i`` writes (may be empty)."""
        lo, hi = self.intervals[i]
        return max(0, lo - self.pad), min(length, hi - self.pad)


def axis_plan(length: int, tile: int, margin: int) -> AxisPlan:
    before, after = infer._pad_amounts(length, tile, margin)
    padded = length + before + after
    pos = infer.tile_positions(padded, tile, margin)
    return AxisPlan(before, tuple(pos), tuple(infer._center_intervals(pos, tile, margin, padded)))


def region_blocks(n_tiles: int, per_region: int) -> list[tuple[int, int]]:
    """Consecutive tile-index ranges [a, b) of at most ``per_region`` tiles."""
    return [(a, min(n_tiles, a + per_region)) for a in range(0, n_tiles, per_region)]


def check_output_dir(path: str | os.PathLike) -> Path:
    """Creates the output folder; a path that exists and is not a folder is one clear error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DataError(f"--output must be a folder, but {p} is a file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the output folder {p}: {e.strerror or e}") from e
    return p


class _Region:
    """One region of the slide: its tiles, its core (what it outputs) and the window it reads."""

    def __init__(self, ya: tuple[int, int], xa: tuple[int, int], yp: AxisPlan, xp: AxisPlan,
                 grid: slides.ModelGrid, tile: int) -> None:
        self.ty, self.tx = range(*ya), range(*xa)
        self.y0, self.y1 = yp.kept(ya[0], grid.height)[0], yp.kept(ya[1] - 1, grid.height)[1]
        self.x0, self.x1 = xp.kept(xa[0], grid.width)[0], xp.kept(xa[1] - 1, grid.width)[1]
        # Read window in unpadded coordinates (may overhang the slide: reflect-padded on read).
        self.wy0 = yp.positions[ya[0]] - yp.pad
        self.wx0 = xp.positions[xa[0]] - xp.pad
        self.wy1 = yp.positions[ya[1] - 1] - yp.pad + tile
        self.wx1 = xp.positions[xa[1] - 1] - xp.pad + tile


def _tissue_checker(mask: np.ndarray, mask_k: float, grid_k: float) -> Callable[[int, int, int, int], bool]:
    """Whether model-grid box [y0, y1) x [x0, x1) has tissue in the thumbnail mask."""
    s = grid_k / mask_k  # mask px per model px
    mh, mw = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def has_tissue(y0: int, y1: int, x0: int, x1: int) -> bool:
        a, b = min(mh, int(math.floor(y0 * s))), min(mh, max(int(math.ceil(y1 * s)), int(math.floor(y0 * s)) + 1))
        c, d = min(mw, int(math.floor(x0 * s))), min(mw, max(int(math.ceil(x1 * s)), int(math.floor(x0 * s)) + 1))
        return bool(integral[b, d] - integral[a, d] - integral[b, c] + integral[a, c] > 0)

    return has_tissue


def _dispatch(forward, img: np.ndarray, region: _Region, yp: AxisPlan, xp: AxisPlan, grid: slides.ModelGrid,
              tile: int, tile_batch: int, tta: bool, has_tissue) -> tuple[list, list]:
    """Starts the forward calls for a region's tissue tiles; returns (chunks, un-awaited outputs)."""
    jobs = [((ty, tx), k) for ty in region.ty for tx in region.tx
            if _writes_tissue(ty, tx, yp, xp, grid, has_tissue) for k in infer.tta_transforms(tta)]

    def window_of(key: tuple[int, int]) -> np.ndarray:
        y = yp.positions[key[0]] - yp.pad - region.wy0
        x = xp.positions[key[1]] - xp.pad - region.wx0
        return img[y:y + tile, x:x + tile]

    chunks = [jobs[s:s + tile_batch] for s in range(0, len(jobs), tile_batch)]
    return chunks, [forward(infer.stack_tiles(c, window_of, tile_batch, tile, 3)) for c in chunks]


def _writes_tissue(ty: int, tx: int, yp: AxisPlan, xp: AxisPlan, grid: slides.ModelGrid, has_tissue) -> bool:
    """Whether tile (ty, tx) writes any pixel of the slide, and that part has tissue."""
    (y0, y1), (x0, x1) = yp.kept(ty, grid.height), xp.kept(tx, grid.width)
    return y1 > y0 and x1 > x0 and has_tissue(y0, y1, x0, x1)


def _collect(chunks, outputs, region: _Region, yp: AxisPlan, xp: AxisPlan, grid: slides.ModelGrid,
             tile: int, tile_batch: int, tta: bool) -> np.ndarray:
    """Waits for a region's forward calls and assembles p(gland) over its core (0 where skipped)."""
    prob = np.zeros((region.y1 - region.y0, region.x1 - region.x0), np.float32)
    averager = infer.TransformAverager(tile_batch, tile, infer.tta_transforms(tta))
    for chunk, out in zip(chunks, outputs):
        for (ty, tx), p in averager.add(chunk, out):
            (y0, y1), (x0, x1) = yp.kept(ty, grid.height), xp.kept(tx, grid.width)
            oy, ox = yp.positions[ty] - yp.pad, xp.positions[tx] - xp.pad
            prob[y0 - region.y0:y1 - region.y0, x0 - region.x0:x1 - region.x0] = \
                p[y0 - oy:y1 - oy, x0 - ox:x1 - ox, 1]
    return prob


def predict_slide(
    config: ml_collections.ConfigDict,
    forward: Callable[[np.ndarray], Any],
    slide_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tile: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Segments one slide and writes ``glands.geojson``, ``glands.csv``, ``overlay.png``, ``summary.json``
    and, with ``eval.write_probability_tiff``, ``probability.ome.tif`` into ``output_dir``.

    ``forward`` maps (``eval.tile_batch``, tile, tile, 3) standardised tiles to logits; it may return
    an array that is not ready yet (a JAX array), which is only awaited after the next region has been
    dispatched. Returns the summary (also written as ``summary.json``).
    """
    ev = config.eval
    if str(config.data.target) != "binary":
        raise DataError(f"config data.target={config.data.target!r}: whole-slide prediction stitches "
                        "two-class (binary) outputs only; use --mode=predict on image files for the "
                        "contour model")
    if float(config.data.scale) != 1.0:
        raise DataError(f"config data.scale={config.data.scale}: for slides, give the resolution the "
                        "model was trained at as eval.mpp (e.g. 0.62 / data.scale) and leave data.scale=1")
    for key in ("split_distance", "split_threshold"):  # the per-image watershed splits
        if float(ev.get(key, 0.0)) > 0:
            raise DataError(f"config eval.{key}={ev[key]}: whole slides are labelled by connected "
                            f"components stitched across regions; pass --config.eval.{key}=0")
    if str(ev.stitch) != "center":
        raise DataError(f"config eval.stitch={ev.stitch!r}: whole slides are stitched with 'center' only "
                        "(each pixel from one tile, so regions need no overlap)")
    start = time.perf_counter()
    out = check_output_dir(output_dir)
    sl = slides.open_slide(slide_path)
    try:
        grid = slides.plan_grid(sl, ev.mpp, ev.slide_mpp, ev.slide_level)
        thumb, thumb_k = slides.thumbnail(sl, int(ev.thumbnail_size))
        tissue = slides.tissue_mask(thumb, float(ev.tissue_min_saturation)) if ev.tissue_mask \
            else np.ones(thumb.shape[:2], bool)
        mean, std = slides.normalization_stats(sl, grid, tissue, thumb_k, seed=int(config.seed))
        margin, tile_batch, tta = int(ev.margin), int(ev.tile_batch), bool(ev.tta)
        yp, xp = axis_plan(grid.height, tile, margin), axis_plan(grid.width, tile, margin)
        per = max(1, int(ev.region_size) // (tile - 2 * margin))
        has_tissue = _tissue_checker(tissue, thumb_k, grid.k)
        regions = []
        for ya in region_blocks(len(yp.positions), per):
            for xa in region_blocks(len(xp.positions), per):
                r = _Region(ya, xa, yp, xp, grid, tile)
                if r.y1 > r.y0 and r.x1 > r.x0 and has_tissue(r.y0, r.y1, r.x0, r.x1):
                    regions.append(r)
        logger.info("%s: %dx%d level-0 px, model grid %dx%d (level %d, %.3f um/px%s), %d tissue regions",
                    sl.name, *sl.level_dimensions[0], grid.width, grid.height, grid.level, grid.mpp or 0,
                    ", resampled" if grid.resample else "", len(regions))

        stitcher = GlandStitcher(grid.height, grid.width, threshold=float(ev.threshold),
                                 fill_holes=bool(ev.fill_holes), opening_radius=int(ev.opening_radius),
                                 min_size=int(ev.min_size))
        spool_path = out / "glands.spool.jsonl"
        raw_path = out / "probability.raw"
        write_tiff = bool(ev.write_probability_tiff)
        n_tiles = 0
        with open(spool_path, "w") as spool, (open(raw_path, "wb") if write_tiff else open(os.devnull, "wb")) as raw:
            band: tuple[int, int] | None = None
            band_buf: np.ndarray | None = None
            rows_written = 0

            def flush_band() -> None:
                nonlocal rows_written
                if band is not None and band_buf is not None:
                    # Rows of skipped bands (no tissue anywhere) are zeros.
                    np.zeros((band[0] - rows_written, grid.width), np.uint8).tofile(raw)
                    band_buf.tofile(raw)
                    rows_written = band[1]

            def finish_region(r: _Region, chunks, outputs) -> None:
                nonlocal band, band_buf
                prob = _collect(chunks, outputs, r, yp, xp, grid, tile, tile_batch, tta)
                for g in stitcher.add_region(r.y0, r.x0, prob):
                    _spool(spool, g)
                if write_tiff:
                    if band != (r.y0, r.y1):
                        flush_band()
                        band, band_buf = (r.y0, r.y1), np.zeros((r.y1 - r.y0, grid.width), np.uint8)
                    band_buf[:, r.x0:r.x1] = np.rint(prob * 255).astype(np.uint8)

            pending = None
            bar = tqdm(regions, desc=f"predict {sl.name}", unit="region", disable=not progress)
            for r in bar:
                region = slides.read_model_region(sl, grid, r.wx0, r.wy0, r.wx1 - r.wx0, r.wy1 - r.wy0)
                img = standardize_with(region, mean, std)
                del region
                chunks, outputs = _dispatch(forward, img, r, yp, xp, grid, tile, tile_batch, tta, has_tissue)
                n_tiles += sum(map(len, chunks))
                del img
                if pending is not None:
                    finish_region(*pending)
                pending = (r, chunks, outputs)
            if pending is not None:
                finish_region(*pending)
            bar.close()
            if write_tiff:
                flush_band()
                np.zeros((grid.height - rows_written, grid.width), np.uint8).tofile(raw)
        merged, absorbed = stitcher.finish()
        summary = _write_outputs(out, sl, grid, thumb, thumb_k, tissue, spool_path, merged, absorbed, ev)
        if write_tiff:
            levels = export.write_probability_ome_tiff(raw_path, grid.width, grid.height,
                                                       out / "probability.ome.tif", grid.mpp)
            summary["probability_tiff_levels"] = levels
        elif raw_path.exists():
            raw_path.unlink()
        seconds = time.perf_counter() - start
        area_mpx = grid.width * grid.height * grid.k * grid.k / 1e6
        summary.update({
            "normalization": {"mean": mean, "std": std},
            "regions": len(regions), "tiles_run": n_tiles, "seconds": round(seconds, 2),
            "slide_megapixels": round(area_mpx, 2),
            "megapixels_per_second": round(area_mpx / seconds, 3) if seconds > 0 else None,
        })
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        return summary
    finally:
        sl.close()


def _spool(f, g: Gland) -> None:
    f.write(json.dumps({"id": g.id, "wkb": shapely.to_wkb(g.polygon, hex=True), "area_px": g.area_px,
                        "prob_sum": g.prob_sum, "prob_px": g.prob_px}) + "\n")


def _read_spool(path: Path) -> Iterator[Gland]:
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            yield Gland(d["id"], shapely.from_wkb(d["wkb"]), d["area_px"], d["prob_sum"], d["prob_px"])


def _write_outputs(out: Path, sl: slides.Slide, grid: slides.ModelGrid, thumb, thumb_k, tissue,
                   spool_path: Path, merged: list[Gland], absorbed: set[int], ev) -> dict[str, Any]:
    """GeoJSON, CSV and overlay from the spool (minus absorbed glands) and the merged glands, in id order."""
    object_type = str(ev.geojson_object_type)
    if object_type not in ("detection", "annotation"):
        raise DataError(f"config eval.geojson_object_type must be 'detection' or 'annotation', got {object_type!r}")
    geo = export.FeatureCollectionWriter(out / "glands.geojson")
    overlay = export.Overlay(thumb, thumb_k, tissue)
    n, total_px = 0, 0
    try:
        with open(out / "glands.csv", "w", newline="") as fcsv:
            writer = export.csv_writer(fcsv)
            glands = (g for g in _read_spool(spool_path) if g.id not in absorbed)
            for g in _chain_sorted(glands, merged):
                feature, row = export.gland_outputs(g, grid.k, grid.mpp, float(ev.polygon_simplify),
                                                    object_type, sl.name)
                geo.write(feature)
                writer.writerow(row)
                overlay.add(g.polygon, grid.k)
                n += 1
                total_px += g.area_px
    finally:
        geo.close()
    spool_path.unlink()
    visualize.save_png(out / "overlay.png", overlay.image())
    w0, h0 = sl.level_dimensions[0]
    return {
        "slide": str(sl.path), "level0_width": w0, "level0_height": h0, "slide_mpp": sl.mpp,
        "level": grid.level, "model_grid": {"width": grid.width, "height": grid.height, "mpp": grid.mpp,
                                            "level0_px_per_px": grid.k, "resampled": grid.resample},
        "glands": n, "total_area_px_model_grid": total_px,
        "total_area_um2": round(total_px * grid.mpp ** 2, 1) if grid.mpp else None,
        "overlay_level0_px_per_px": thumb_k,
    }


def _chain_sorted(spooled: Iterator[Gland], merged: list[Gland]) -> Iterator[Gland]:
    """Spooled glands (already in id order) and the merged ones (higher ids) as one id-ordered stream."""
    yield from spooled
    yield from sorted(merged, key=lambda g: g.id)
