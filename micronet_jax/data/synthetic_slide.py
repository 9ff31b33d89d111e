"""Synthetic whole-slide images: the package's synthetic glands tiled into a pyramidal TIFF with mpp.

Why: slide prediction must be tested (and its memory measured) on slides of tens of thousands of pixels a
side, and real slides cannot be shipped. A :class:`SyntheticSlide` is a mosaic of blocks, each one of a
few synthetic GlaS-sized images (:func:`make_synthetic_glands`), laid on white glass inside given tissue
boxes. Any region at any pyramid level is computed on demand by index arithmetic, so a 40,000 px slide
is written tile by tile in bounded memory, and a test can get the exact level-0 pixels of any region to
compare with.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from micronet_jax.data.synthetic import make_synthetic_glands

__all__ = ["SyntheticSlide"]

GLASS = (244, 243, 241)  # near-white, unsaturated, as empty glass scans


class SyntheticSlide:
    """A ``height`` x ``width`` level-0 mosaic; ``tissue`` boxes (y0, x0, y1, x1), None = all tissue."""

    def __init__(self, height: int, width: int, *, seed: int = 0, num_blocks: int = 4,
                 block: tuple[int, int] = (522, 775), tissue: Sequence[tuple[int, int, int, int]] | None = None):
        self.height, self.width = int(height), int(width)
        self.block = block
        self.library = np.stack([ex.image for ex in make_synthetic_glands(num_blocks, *block, seed=seed)])
        self.tissue = None if tissue is None else [tuple(int(v) for v in b) for b in tissue]

    def region(self, y0: int, x0: int, h: int, w: int, downsample: int = 1) -> np.ndarray:
        """uint8 RGB (h, w, 3) at a level ``downsample`` times coarser (nearest level-0 pixel)."""
        ys = (np.arange(y0, y0 + h) * downsample).clip(0, self.height - 1)
        xs = (np.arange(x0, x0 + w) * downsample).clip(0, self.width - 1)
        bh, bw = self.block
        # Blocks are chosen by a fixed hash of their grid position, so neighbours differ.
        bid = (ys[:, None] // bh * 7 + xs[None, :] // bw * 3 + (ys[:, None] // bh) * (xs[None, :] // bw)) \
            % len(self.library)
        out = self.library[bid, (ys % bh)[:, None], (xs % bw)[None, :]]
        if self.tissue is not None:
            inside = np.zeros((h, w), bool)
            for by0, bx0, by1, bx1 in self.tissue:
                inside |= ((ys >= by0) & (ys < by1))[:, None] & ((xs >= bx0) & (xs < bx1))[None, :]
            out[~inside] = GLASS
        return out

    def _tiles(self, downsample: int, tile: int) -> Iterator[np.ndarray]:
        lh, lw = -(-self.height // downsample), -(-self.width // downsample)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                t = np.zeros((tile, tile, 3), np.uint8)
                h, w = min(tile, lh - ty), min(tile, lw - tx)
                t[:h, :w] = self.region(ty, tx, h, w, downsample)
                yield t

    def write(self, path: str | os.PathLike, mpp: float | None = 0.62, levels: int | None = None,
              tile: int = 256, compression: str = "zlib") -> None:
        """A tiled pyramidal (BigTIFF, sub-IFD) TIFF, each level half the previous, with the
        resolution tags that slide readers turn into mpp (``mpp=None``: no resolution, as in some
        exported TIFFs)."""
        import tifffile

        if levels is None:
            levels = 1
            while max(self.height, self.width) / 2 ** levels >= 1024:
                levels += 1
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for lv in range(levels):
                ds = 2 ** lv
                shape = (-(-self.height // ds), -(-self.width // ds), 3)
                opts = dict(shape=shape, dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                            compression=compression)
                if mpp:
                    px_per_cm = 1e4 / (mpp * ds)
                    opts.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                if lv == 0:
                    tw.write(self._tiles(ds, tile), subifds=levels - 1, **opts)
                else:
                    tw.write(self._tiles(ds, tile), subfiletype=1, **opts)
