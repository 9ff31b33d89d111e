"""Whole-slide images: opening, pyramid levels, resolution, region reads, thumbnails and the tissue mask.

Why a module of its own: a slide is not an image. It is tens of thousands of pixels a side, stored as a
pyramid of tiled levels, with its physical resolution (micrometres per pixel, mpp) in vendor metadata, and
mostly white glass. Everything downstream (:mod:`micronet_jax.wsi`) only ever asks this module for one
region at a time on the *model grid*: the pixel grid at the model's training resolution
(``eval.mpp``), whichever level or resampling produces it. So peak memory is set by the region size.

Reading goes through tiffslide (tifffile + zarr; SVS, generic and pyramidal TIFF, OME-TIFF, no system
libraries). Other vendor formats (NDPI, MRXS, SCN, ...) are read with openslide-python when it is
installed (``pip install '.[openslide]'``). Every failure is a :class:`DataError` naming the slide.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from micronet_jax.data.readers import DataError

__all__ = [
    "SLIDE_SUFFIXES", "Slide", "ModelGrid", "is_slide_file", "open_slide", "plan_grid",
    "read_model_region", "thumbnail", "tissue_mask", "normalization_stats",
]

# Files that are slides by their name alone; .tif/.tiff are slides when tiled or pyramidal (is_slide_file).
SLIDE_SUFFIXES = {".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide"}
_TIFF_SUFFIXES = {".tif", ".tiff"}
# A TIFF with more pixels than this is read as a slide even if it is striped and single-level: reading
# it whole (the ordinary-image path) would need gigabytes.
_LARGE_TIFF_PIXELS = 10_000 * 10_000


@dataclass
class Slide:
    """An open slide. Sizes are (width, height) per level, as in OpenSlide; level 0 is the finest."""

    path: Path
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # level-0 micrometres per pixel (mean of x and y), None when the file has none
    _reader: Any

    @property
    def name(self) -> str:
        return self.path.name

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 RGB (h, w, 3) at ``level`` from level coordinates (x, y); must lie inside the level."""
        lw, lh = self.level_dimensions[level]
        if x < 0 or y < 0 or x + w > lw or y + h > lh or w <= 0 or h <= 0:
            raise ValueError(f"region x={x} y={y} w={w} h={h} is outside level {level} ({lw}x{lh})")
        ds = self.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))  # OpenSlide's API takes level-0 coordinates
        try:
            region = self._reader.read_region(loc, level, (w, h), as_array=True)
        except TypeError:  # openslide-python: a PIL RGBA image, no as_array
            region = np.asarray(self._reader.read_region(loc, level, (w, h)))
        except Exception as e:  # noqa: BLE001 - a codec or I/O failure deep in the reader
            raise DataError(f"could not read slide {self.path} (level {level}, x={x}, y={y}): {e}") from e
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=-1)
        if region.dtype != np.uint8:
            raise DataError(f"slide {self.path} has {region.dtype} pixels; only 8-bit RGB slides are supported")
        return np.ascontiguousarray(region[..., :3])

    def close(self) -> None:
        self._reader.close()


def is_slide_file(path: str | os.PathLike) -> bool:
    """True for slide formats, and for TIFFs that are tiled, pyramidal or too large to read whole."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in _TIFF_SUFFIXES:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(p) as tif:
            page = tif.pages.first
            series = tif.series[0] if tif.series else None
            levels = len(series.levels) if series is not None else 1
            pixels = int(page.imagelength) * int(page.imagewidth)
            return bool(page.is_tiled or levels > 1 or pixels > _LARGE_TIFF_PIXELS)
    except Exception:  # noqa: BLE001 - an unreadable TIFF: let the slide reader name the problem
        return True


def open_slide(path: str | os.PathLike) -> Slide:
    """Opens a slide with tiffslide, falling back to openslide for formats tiffslide does not read."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"slide not found: {p}")
    if not p.is_file():
        raise DataError(f"slide is not a file: {p}")
    errors = []
    try:
        import tiffslide

        reader = tiffslide.TiffSlide(p)
        mpp = _mean_mpp(reader.properties.get("tiffslide.mpp-x"), reader.properties.get("tiffslide.mpp-y"))
        return _checked(Slide(p, tuple(reader.level_dimensions), tuple(reader.level_downsamples), mpp, reader))
    except ImportError:
        errors.append("tiffslide is not installed (pip install 'micronet-jax[slide]')")
    except Exception as e:  # noqa: BLE001 - tiffslide raises several types for files it cannot read
        errors.append(f"tiffslide: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        import openslide

        reader = openslide.OpenSlide(str(p))
        mpp = _mean_mpp(reader.properties.get("openslide.mpp-x"), reader.properties.get("openslide.mpp-y"))
        return _checked(Slide(p, tuple(reader.level_dimensions), tuple(reader.level_downsamples), mpp, reader))
    except ImportError:
        errors.append("openslide-python, which reads the other vendor formats, is not installed "
                      "(pip install 'micronet-jax[openslide]')")
    except Exception as e:  # noqa: BLE001
        errors.append(f"openslide: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    raise DataError(f"unreadable or unsupported slide {p}: " + "; ".join(errors))


def _mean_mpp(mx: Any, my: Any) -> float | None:
    vals = []
    for v in (mx, my):
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f) and f > 0:
            vals.append(f)
    return float(np.mean(vals)) if vals else None


def _checked(slide: Slide) -> Slide:
    if not slide.level_dimensions or min(slide.level_dimensions[0]) <= 0:
        raise DataError(f"slide {slide.path} has no image data")
    return slide


@dataclass(frozen=True)
class ModelGrid:
    """The pixel grid the model sees: which level is read, and how model pixels map to level 0.

    Model pixel (x, y) covers level-0 pixels [x*k, (x+1)*k). ``resample`` says whether the level's pixels
    are resized to reach the model grid (False when the level already is at the target resolution).
    """

    level: int
    k: float  # level-0 pixels per model pixel
    width: int
    height: int
    mpp: float | None  # micrometres per model pixel (None: unknown, areas stay in pixels)
    resample: bool
    level_downsample: float  # level-0 pixels per pixel of the level read

    @property
    def level_scale(self) -> float:
        """Level pixels per model pixel."""
        return self.k / self.level_downsample


# Resolutions within this relative distance of the target are used as they are: a 2% scale error is far
# below the spread of scanner calibrations, and not resampling keeps reads exact and fast.
_MPP_TOLERANCE = 0.02


def plan_grid(slide: Slide, target_mpp: float | None, slide_mpp: float | None = None,
              level: int | None = None) -> ModelGrid:
    """Chooses the level to read and the model grid (spec §5 resolution; issue: ``eval.mpp``).

    ``target_mpp`` None means "use the level's pixels as they are" (level 0 unless ``level`` is given).
    Otherwise the slide's own mpp (or ``slide_mpp`` when given, which wins) must be known, and the level
    read is the coarsest one that is still at least as fine as the target, resampled down to it unless
    it is within 2% already. Asking for a level the slide does not have is an error naming both.
    """
    n = len(slide.level_dimensions)
    if level is not None and not 0 <= int(level) < n:
        sizes = ", ".join(f"{i}: {w}x{h}" for i, (w, h) in enumerate(slide.level_dimensions))
        raise DataError(f"config eval.slide_level={level}: slide {slide.path} has {n} level(s) ({sizes})")
    mpp0 = float(slide_mpp) if slide_mpp else slide.mpp
    if target_mpp is None:
        lv = int(level or 0)
        ds = float(slide.level_downsamples[lv])
        w, h = slide.level_dimensions[lv]
        return ModelGrid(lv, ds, int(w), int(h), mpp0 * ds if mpp0 else None, False, ds)
    if mpp0 is None:
        raise DataError(
            f"slide {slide.path} has no resolution (mpp) in its metadata: give it with "
            f"--config.eval.slide_mpp=UM_PER_PX, or set --config.eval.mpp=None to use its pixels as they are")
    target = float(target_mpp)
    if target <= 0:
        raise DataError(f"config eval.mpp must be > 0, got {target_mpp}")
    k = target / mpp0  # level-0 pixels per model pixel
    if level is None:
        # Coarsest level not coarser than the target (allowing the tolerance).
        candidates = [i for i, d in enumerate(slide.level_downsamples) if d <= k * (1 + _MPP_TOLERANCE)]
        lv = max(candidates, key=lambda i: slide.level_downsamples[i]) if candidates else 0
    else:
        lv = int(level)
    ds = float(slide.level_downsamples[lv])
    lw, lh = slide.level_dimensions[lv]
    if abs(k / ds - 1.0) <= _MPP_TOLERANCE:
        return ModelGrid(lv, ds, int(lw), int(lh), mpp0 * ds, False, ds)
    w0, h0 = slide.level_dimensions[0]
    return ModelGrid(lv, k, max(1, int(round(w0 / k))), max(1, int(round(h0 / k))), target, True, ds)


def _read_grid_box(slide: Slide, grid: ModelGrid, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Model-grid pixels [y0, y1) x [x0, x1), all inside the grid."""
    if not grid.resample:
        return slide.read(grid.level, x0, y0, x1 - x0, y1 - y0)
    s = grid.level_scale  # level px per model px
    lw, lh = slide.level_dimensions[grid.level]
    # The level box that covers the model box, plus a pixel of context for the resampling filter.
    lx0, ly0 = max(0, int(math.floor(x0 * s)) - 1), max(0, int(math.floor(y0 * s)) - 1)
    lx1, ly1 = min(lw, int(math.ceil(x1 * s)) + 1), min(lh, int(math.ceil(y1 * s)) + 1)
    src = slide.read(grid.level, lx0, ly0, lx1 - lx0, ly1 - ly0)
    box = (x0 * s - lx0, y0 * s - ly0, x1 * s - lx0, y1 * s - ly0)
    # Antialiased (area-like) filter when shrinking, bicubic when enlarging.
    resample = Image.Resampling.BOX if s > 1 else Image.Resampling.BICUBIC
    out = Image.fromarray(src).resize((x1 - x0, y1 - y0), resample=resample, box=box)
    return np.asarray(out)


def read_model_region(slide: Slide, grid: ModelGrid, x: int, y: int, w: int, h: int) -> np.ndarray:
    """uint8 RGB (h, w, 3) of the model grid from (x, y), reflect-padded where it leaves the slide.

    The reflection is numpy's "reflect" about the slide's edge pixels, so a region that overhangs the
    slide gets exactly the pixels that padding the whole slide would have given it (for overhangs
    shorter than the part inside, which the tile margins guarantee).
    """
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(grid.width, x + w), min(grid.height, y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"region x={x} y={y} w={w} h={h} does not overlap the {grid.width}x{grid.height} grid")
    inside = _read_grid_box(slide, grid, x0, y0, x1, y1)
    pads = ((y0 - y, y + h - y1), (x0 - x, x + w - x1), (0, 0))
    if any(p for pair in pads for p in pair):
        inside = np.pad(inside, pads, mode="reflect" if min(inside.shape[:2]) > 1 else "edge")
    return inside


def thumbnail(slide: Slide, max_side: int) -> tuple[np.ndarray, float]:
    """A low-resolution RGB view (longer side <= ``max_side``) and its level-0 pixels per thumbnail pixel.

    Reads the finest level that is already small enough, shrinking it once; a slide without such a level
    (a single-level TIFF) is read in strips that are shrunk one by one, so memory stays bounded.
    """
    w0, h0 = slide.level_dimensions[0]
    scale = max(w0, h0) / float(max_side)  # level-0 px per thumbnail px
    if scale <= 1:
        return slide.read(0, 0, 0, w0, h0), 1.0
    tw, th = max(1, int(round(w0 / scale))), max(1, int(round(h0 / scale)))
    fits = [i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) <= 4 * max_side]
    if fits:
        lv = min(fits)
        lw, lh = slide.level_dimensions[lv]
        img = Image.fromarray(slide.read(lv, 0, 0, lw, lh)).resize((tw, th), Image.Resampling.BOX)
        return np.asarray(img), w0 / tw
    # Strips of level 0 whose height maps to whole thumbnail rows.
    lw, lh = w0, h0
    rows_per_strip = max(1, int(2 ** 24 // (lw * scale)))  # thumbnail rows per strip of ~16 M level-0 px
    out = np.zeros((th, tw, 3), np.uint8)
    for ty in range(0, th, rows_per_strip):
        ty1 = min(th, ty + rows_per_strip)
        y0, y1 = int(round(ty * h0 / th)), min(lh, int(round(ty1 * h0 / th)))
        strip = slide.read(0, 0, y0, lw, max(1, y1 - y0))
        out[ty:ty1] = np.asarray(Image.fromarray(strip).resize((tw, ty1 - ty), Image.Resampling.BOX))
    return out, w0 / tw


def tissue_mask(thumb: np.ndarray, min_saturation: float = 0.05, dilate: int = 2) -> np.ndarray:
    """Tissue (True) versus glass on a thumbnail: Otsu's threshold on the HSV saturation.

    Stained tissue is coloured and glass is grey-white, so saturation separates them better than
    brightness (which faint eosin shares with glass). ``min_saturation`` is a floor on the threshold so a
    slide that is all tissue or all glass (Otsu's threshold then splits noise) does not lose its tissue
    or keep its glass. A small dilation keeps the pale edges of tissue and lumina at the boundary.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rgb = np.asarray(thumb, np.uint8)
    hi, lo = rgb.max(axis=-1).astype(np.float32), rgb.min(axis=-1).astype(np.float32)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0.0)  # HSV saturation, as skimage's rgb2hsv
    t = float(threshold_otsu(sat)) if np.ptp(sat) > 0 else 1.0
    mask = sat > max(t, float(min_saturation))
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=2))
    if dilate > 0:
        mask = ndimage.binary_dilation(mask, iterations=int(dilate))
    return mask


# Standardisation statistics are estimated from this many model-grid pixels of tissue.
_NORM_SAMPLE_PIXELS = 4 * 1024 * 1024
_NORM_PATCH = 256


def normalization_stats(slide: Slide, grid: ModelGrid, mask: np.ndarray, mask_k: float,
                        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of tissue pixel values on the 0-1 scale, for the per-image standardisation.

    Training standardises each GlaS image with its own statistics (spec §7.14), and a GlaS image is
    tissue. A slide's own statistics would be dominated by glass, and per-region statistics would
    change the input from one region to the next (seams). So one pair for the whole slide, from
    64 patches of 256x256 model-grid pixels at random tissue positions (about 4 Mpx, seeded).
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        ys, xs = np.nonzero(np.ones_like(mask))
    scale = mask_k / grid.k  # model px per mask px
    n_patches = max(1, _NORM_SAMPLE_PIXELS // (_NORM_PATCH * _NORM_PATCH))
    counts = np.zeros(256, np.float64)
    for i in rng.choice(len(ys), size=n_patches, replace=len(ys) < n_patches):
        # A patch centred on the sampled tissue pixel, moved inside the grid.
        w, h = min(_NORM_PATCH, grid.width), min(_NORM_PATCH, grid.height)
        x0 = min(max(0, int((xs[i] + 0.5) * scale) - w // 2), grid.width - w)
        y0 = min(max(0, int((ys[i] + 0.5) * scale) - h // 2), grid.height - h)
        counts += np.bincount(_read_grid_box(slide, grid, x0, y0, x0 + w, y0 + h).reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    std = float(np.sqrt(max(float(counts @ (values - mean) ** 2) / n, 0.0)))
    return mean, max(std, 1.0 / math.sqrt(n))
