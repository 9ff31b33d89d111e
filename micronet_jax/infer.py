"""Tiled whole-image inference (spec §5), independent of the model.

Micro-Net only accepts a fixed input size and its border outputs come from extrapolating transposed
convs, so whole images are processed as overlapping tiles: reflect-pad by ``margin``, tiles of ``tile``
with stride ``tile - 2*margin``, the last tile flush with the far edge. ``stitch="center"`` keeps each
tile's centre (each output pixel comes from exactly one tile, at least ``margin`` from that tile's
edge wherever the padded image allows); ``stitch="blend"`` averages overlaps with a smooth positive
window. ``forward_fn`` is always called with exactly ``tile_batch`` tiles (the last batch is padded with
zeros) so a jitted function compiles once. Bookkeeping is numpy; progress bars are the caller's job.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["tile_positions", "tiled_predict", "dihedral", "dihedral_inverse", "blend_window",
           "tta_transforms", "stack_tiles", "TransformAverager"]

ForwardFn = Callable[[np.ndarray], Any]


def tile_positions(length: int, tile: int, margin: int) -> list[int]:
    """Start offsets of tiles along one axis of an already padded length (``length >= tile``).

    Stride is ``tile - 2*margin`` so the kept centres abut; the last tile is flush with the far edge.
    Example (spec §5): 903 -> [0, 380, 395]; 650 -> [0, 142].
    """
    stride = tile - 2 * margin
    if stride <= 0:
        raise ValueError(f"tile ({tile}) must be larger than 2 * margin ({2 * margin})")
    if length < tile:
        raise ValueError(f"padded length {length} is smaller than the tile ({tile})")
    return list(range(0, length - tile, stride)) + [length - tile]


def _center_intervals(positions: list[int], tile: int, margin: int, length: int) -> list[tuple[int, int]]:
    """Padded-coordinate interval each tile writes in "center" mode: abutting, no overlaps.

    Each tile keeps [p + margin, p + tile - margin), the first extends to 0 and the last to ``length``
    (those parts are padding anyway); the flush last tile writes only what is not already covered.
    """
    out = []
    prev_hi = 0
    for k, p in enumerate(positions):
        lo = 0 if k == 0 else max(p + margin, prev_hi)
        hi = length if k == len(positions) - 1 else p + tile - margin
        out.append((lo, hi))
        prev_hi = hi
    return out


def blend_window(tile: int, margin: int) -> np.ndarray:
    """1-D weight for "blend": raised-cosine ramps over 2*margin at each end, 1 in the middle, > 0.

    A ramp as long as the overlap of neighbouring tiles (2*margin) cross-fades them smoothly, and the
    low weight near tile edges down-weights the extrapolated borders.
    """
    ramp = max(1, min(2 * margin, tile // 2))
    i = np.arange(tile, dtype=np.float64)
    d = np.minimum(i, tile - 1 - i)  # distance to the nearest tile edge
    w = np.where(d < ramp, 0.5 - 0.5 * np.cos(np.pi * (d + 0.5) / ramp), 1.0)
    return w.astype(np.float32)


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """Transform k in 0..7 of the square-symmetry group on axes (1, 2): rot90^(k%4) after a flip if k>=4."""
    if k >= 4:
        x = x[:, :, ::-1]
    return np.rot90(x, k % 4, axes=(1, 2))


def dihedral_inverse(x: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`dihedral` (maps outputs back to the original tile orientation)."""
    x = np.rot90(x, -(k % 4), axes=(1, 2))
    if k >= 4:
        x = x[:, :, ::-1]
    return x


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def tta_transforms(tta: bool) -> list[int]:
    """The dihedral transforms each tile goes through: all 8 with test-time augmentation, else identity."""
    return list(range(8)) if tta else [0]


def stack_tiles(chunk: list[tuple[Any, int]], window_of: Callable[[Any], np.ndarray], tile_batch: int,
                tile: int, channels: int) -> np.ndarray:
    """One forward batch of exactly ``tile_batch`` tiles: each ``(key, k)`` of ``chunk`` is the window
    of tile ``key`` under transform ``k``; the slots past the chunk stay zero (one compiled shape)."""
    batch = np.zeros((tile_batch, tile, tile, channels), np.float32)
    for b, (key, k) in enumerate(chunk):
        batch[b] = dihedral(window_of(key)[None], k)[0]
    return batch


class TransformAverager:
    """Turns forward outputs back into per-tile probabilities: softmax, each transform undone, and the
    mean over a tile's transforms once its last one has arrived. Shared by image and slide inference,
    so both check the forward's output and average TTA the same way."""

    def __init__(self, tile_batch: int, tile: int, transforms: list[int]) -> None:
        self.tile_batch, self.tile, self.transforms = tile_batch, tile, transforms
        self._partial: dict[Any, np.ndarray] = {}

    def add(self, chunk: list[tuple[Any, int]], output: Any) -> Iterator[tuple[Any, np.ndarray]]:
        """Consumes the forward's logits for ``chunk``; yields ``(key, probabilities (tile, tile, C))``
        for every tile of the chunk whose transforms are now complete."""
        logits = np.asarray(output, dtype=np.float32)
        if logits.ndim != 4 or logits.shape[:3] != (self.tile_batch, self.tile, self.tile):
            raise ValueError(
                f"forward_fn must return logits of shape ({self.tile_batch}, {self.tile}, {self.tile}, C), "
                f"got {logits.shape}")
        probs = _softmax(logits[:len(chunk)])
        for b, (key, k) in enumerate(chunk):
            p = dihedral_inverse(probs[b:b + 1], k)[0]
            self._partial[key] = self._partial[key] + p if key in self._partial else p.copy()
            if k == self.transforms[-1]:
                yield key, self._partial.pop(key) / len(self.transforms)


def _pad_amounts(size: int, tile: int, margin: int) -> tuple[int, int]:
    """Margin on both sides, plus extra (split evenly) when the image is smaller than a tile."""
    extra = max(0, tile - (size + 2 * margin))
    return margin + extra // 2, margin + extra - extra // 2


def tiled_predict(
    forward_fn: ForwardFn,
    image: np.ndarray,
    *,
    tile: int = 508,
    margin: int = 64,
    stitch: str = "center",
    tile_batch: int = 4,
    tta: bool = False,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Softmax probabilities (H, W, C) float32 for an image (H, W, 3) of any size.

    ``preprocess`` maps each (tile, tile, 3) window of the reflect-padded image to the network's
    float32 input (the evaluator passes per-tile standardisation, as training standardises each
    crop); without it the image must already be the float32 network input.

    ``forward_fn`` maps (tile_batch, tile, tile, 3) float32 to logits (tile_batch, tile, tile, C); it is
    always called with exactly ``tile_batch`` tiles. ``tta`` averages probabilities over the 8 dihedral
    transforms of each tile (each output mapped back before averaging).
    """
    if stitch not in ("center", "blend"):
        raise ValueError(f"stitch must be 'center' or 'blend', got {stitch!r}")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    if margin < 0 or tile - 2 * margin <= 0:
        raise ValueError(f"need 0 <= margin and tile > 2*margin, got tile={tile}, margin={margin}")
    img = np.asarray(image) if preprocess is not None else np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"image must be (H, W, channels), got shape {img.shape}")
    h, w = img.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"image is empty: shape {img.shape}")

    (top, bottom), (left, right) = _pad_amounts(h, tile, margin), _pad_amounts(w, tile, margin)
    # numpy's reflect repeats the reflection when a pad exceeds the axis, so tiny images work too.
    padded = np.pad(img, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    ph, pw = padded.shape[:2]
    ys, xs = tile_positions(ph, tile, margin), tile_positions(pw, tile, margin)
    tiles = [(y, x) for y in ys for x in xs]
    transforms = tta_transforms(tta)
    jobs = [(t, k) for t in range(len(tiles)) for k in transforms]

    if stitch == "center":
        y_iv = dict(zip(ys, _center_intervals(ys, tile, margin, ph)))
        x_iv = dict(zip(xs, _center_intervals(xs, tile, margin, pw)))
    else:
        win1 = blend_window(tile, margin)
        win = (win1[:, None] * win1[None, :])[..., None]

    out: np.ndarray | None = None
    wsum = np.zeros((ph, pw, 1), np.float32) if stitch == "blend" else None
    windows: dict[int, np.ndarray] = {}
    averager = TransformAverager(tile_batch, tile, transforms)

    def window_of(t: int) -> np.ndarray:
        if t not in windows:  # preprocess each tile once, not once per TTA transform
            y, x = tiles[t]
            window = padded[y:y + tile, x:x + tile]
            windows[t] = preprocess(window) if preprocess is not None else window
        return windows[t]

    for s in range(0, len(jobs), tile_batch):
        chunk = jobs[s:s + tile_batch]
        batch = stack_tiles(chunk, window_of, tile_batch, tile, img.shape[2])
        for t, k in chunk:
            if k == transforms[-1]:
                del windows[t]
        for t, p in averager.add(chunk, forward_fn(batch)):
            if out is None:
                out = np.zeros((ph, pw, p.shape[-1]), np.float32)
            y, x = tiles[t]
            if stitch == "center":
                (y0, y1), (x0, x1) = y_iv[y], x_iv[x]
                out[y0:y1, x0:x1] = p[y0 - y:y1 - y, x0 - x:x1 - x]
            else:
                out[y:y + tile, x:x + tile] += p * win
                wsum[y:y + tile, x:x + tile] += win
    assert out is not None
    if stitch == "blend":
        out /= wsum
    return np.ascontiguousarray(out[top:top + h, left:left + w])
