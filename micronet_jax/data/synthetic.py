"""Synthetic H&E-like gland images with instance labels: the package's embedded default dataset.

Why it exists: the real GlaS data is research data that may not be redistributed, so tests, demos,
smoke runs and CI need a stand-in that exercises the same code paths (RGB uint8 images of GlaS size,
instance labels with touching glands, benign and malignant-looking shapes). It is not meant to teach
a model histology; it is meant to look enough like GlaS that a pipeline bug (wrong channel order,
mask misaligned with image, touching glands merged) is visible.

How an image is made:

1. Gland shapes: random-radius polar curves ``r(t) = R (1 + sum_k a_k cos(k t + p_k))`` on a rotated
   ellipse. Regular (benign) glands have small harmonics; irregular (malignant-looking) ones large.
   Some glands are placed against an earlier one so that the two touch; where shapes overlap the
   earlier gland keeps the pixels, so labels never overlap.
2. Stain concentrations: per-pixel haematoxylin (H) and eosin (E) amounts. Stroma is eosin with a
   fibrous texture (anisotropically smoothed noise); each gland has an epithelial rim (distance to
   its boundary below a noisy thickness) and a pale lumen inside it; nuclei are small dark H ellipses
   along the rim (oriented across the boundary, crowded and multi-layered in irregular glands) and
   scattered in the stroma; benign glands get pale goblet-cell vacuoles; a thin white retraction gap
   surrounds some glands, as in real sections.
3. Colour: Beer-Lambert mixing ``RGB = 255 exp(-(H h + E e))`` with the Ruifrok-Johnston H and E
   optical-density vectors, so colours are plausible by construction; then a mild blur and noise.

Determinism: image ``i`` of ``make_synthetic_glands(n, seed=s)`` comes from its own generator seeded
with ``SeedSequence(s, spawn_key=(i,))``, so it does not depend on ``n`` (``n=3`` gives the first three
images of ``n=28``) and is bit-for-bit reproducible on any machine with the same numpy/scipy.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from micronet_jax.data.readers import Example

__all__ = ["make_synthetic_glands", "write_glas_layout"]

# Optical-density vectors (R, G, B), normalised: haematoxylin from Ruifrok & Johnston (2001); eosin
# tilted towards blue absorption from their value so that stroma comes out the magenta-pink of
# GlaS slides (mean RGB about (201, 130, 200)) rather than a bluish pink.
_H_OD = np.array([0.650, 0.704, 0.286], np.float32)
_H_OD /= np.linalg.norm(_H_OD)
_E_OD = np.array([0.10, 0.95, 0.30], np.float32)
_E_OD /= np.linalg.norm(_E_OD)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of shape (h, w).

    Filtered on a grid coarser by a factor that grows with ``sigma`` (2 to 8) and upsampled by
    repetition plus a box filter: large-scale fields cost almost nothing this way, which matters
    because each image needs several of them.
    """
    sig = np.broadcast_to(np.asarray(sigma, np.float32), (2,))
    f = int(np.clip(float(sig.min()) // 3.0, 2, 8))
    hh, ww = h // f + 2, w // f + 2
    n = ndimage.gaussian_filter(rng.standard_normal((hh, ww), dtype=np.float32), sig / f, mode="wrap", truncate=3.0)
    n = np.repeat(np.repeat(n, f, axis=0), f, axis=1)[:h, :w]
    n = ndimage.uniform_filter(n, f)  # Removes the blockiness of the upsampling.
    n -= n.mean()
    return n / (n.std() + np.float32(1e-6))


def _tri_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance noise from two uniform bytes (a triangular distribution).

    Pixel noise does not need Gaussian tails, and drawing bytes is several times faster than
    ``standard_normal`` for the 1.2 M values an image needs.
    """
    a = rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32)
    a += rng.integers(0, 256, shape, dtype=np.uint8)
    return (a - np.float32(255.0)) * np.float32(1.0 / 104.4)  # std of the sum of two U{0..255}.


def _stamp_ellipses(
    canvas: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    value: np.ndarray,
) -> None:
    """Draws filled ellipses into ``canvas`` in place, keeping the per-pixel maximum.

    Vectorised over all ellipses at once (one (N, P, P) patch grid and one ``np.maximum.at``), because
    an image has ~10^3 nuclei and a Python loop over them would dominate generation time.
    ``a`` is the semi-axis along direction ``theta`` (radians, image coordinates y down).
    """
    if len(cy) == 0:
        return
    h, w = canvas.shape
    r = int(np.ceil(max(float(a.max()), float(b.max())))) + 1
    # Draw on a canvas padded by r so patches never need bounds checks; copy the interior back.
    wp = w + 2 * r
    padded = np.zeros((h + 2 * r, wp), canvas.dtype)
    padded[r : r + h, r : r + w] = canvas
    off = np.arange(-r, r + 1, dtype=np.float32)
    iy = np.rint(cy).astype(np.int64)
    ix = np.rint(cx).astype(np.int64)
    dy = off[None, :, None] + (iy - cy).astype(np.float32)[:, None, None]
    dx = off[None, None, :] + (ix - cx).astype(np.float32)[:, None, None]
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    u = (dx * c + dy * s) * (1.0 / a).astype(np.float32)[:, None, None]
    v = (dy * c - dx * s) * (1.0 / b).astype(np.float32)[:, None, None]
    val = np.clip((1.0 - (u * u + v * v)) * 3.0, 0.0, 1.0) * value.astype(np.float32)[:, None, None]
    rel = (np.arange(2 * r + 1)[:, None] * wp + np.arange(2 * r + 1)[None, :]).astype(np.int64)
    flat = (iy * wp + ix)[:, None, None] + rel[None]
    ok = val > 0
    np.maximum.at(padded.reshape(-1), flat[ok], val[ok])
    canvas[...] = padded[r : r + h, r : r + w]


def _spaced_points(rng: np.random.Generator, mask: np.ndarray, cell: float, tries: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Random points inside ``mask``, at most one per ``cell`` x ``cell`` square (a cheap blue noise).

    Each grid cell draws ``tries`` jittered candidates and keeps the first that lands in the mask:
    the cost scales with the number of cells, not pixels, and thin masks (a 5-px nuclear rim) are
    still hit reliably.
    """
    h, w = mask.shape
    gy, gx = np.meshgrid(np.arange(0, h, cell, dtype=np.float32), np.arange(0, w, cell, dtype=np.float32), indexing="ij")
    gy, gx = gy.ravel(), gx.ravel()
    cy = np.minimum(gy[:, None] + rng.random((gy.size, tries), dtype=np.float32) * cell, np.float32(h - 1))
    cx = np.minimum(gx[:, None] + rng.random((gx.size, tries), dtype=np.float32) * cell, np.float32(w - 1))
    iy = cy.astype(np.int64)
    ix = cx.astype(np.int64)
    hit = mask[iy, ix]
    first = np.argmax(hit, axis=1)
    ok = hit[np.arange(gy.size), first]
    rows = np.nonzero(ok)[0]
    return cy[rows, first[rows]], cx[rows, first[rows]]


def _place_glands(
    rng: np.random.Generator, h: int, w: int, scale: float, malignant: bool, touch_prob: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (label map int32 with ids 1..K, per-id 'irregular' flags with index 0 unused).

    Each new gland is placed against an earlier one with probability ``touch_prob``.
    """
    label = np.zeros((h, w), np.int32)
    centres: list[tuple[float, float, float]] = []  # (y, x, mean radius)
    irregular_flags = [False]
    target_cover = rng.uniform(0.35, 0.5)
    p_irregular = 0.75 if malignant else 0.12
    yy_full = np.arange(h, dtype=np.float32)
    xx_full = np.arange(w, dtype=np.float32)
    n_lut = 512  # r(t) is tabulated: a table lookup per pixel instead of 5 cosines.
    t_lut = np.linspace(-np.pi, np.pi, n_lut + 1, dtype=np.float32)
    ks = np.arange(2, 7, dtype=np.float32)
    area = float(h * w)
    covered = 0
    for _ in range(60):
        if covered / area >= target_cover or len(centres) >= 30:
            break
        irregular = bool(rng.random() < p_irregular)
        radius = (rng.uniform(55.0, 115.0) if irregular else rng.uniform(45.0, 85.0)) * scale
        aspect = rng.uniform(1.3, 3.0) if irregular else rng.uniform(1.0, 1.8)
        angle = rng.uniform(0, np.pi)
        if irregular:
            amp = rng.uniform(0.05, 0.18, ks.size) / ks**0.5
        else:
            amp = rng.uniform(0.0, 0.05, ks.size) / ks
        phase = rng.uniform(0, 2 * np.pi, ks.size)
        r_lut = (1.0 + (amp[:, None] * np.cos(ks[:, None] * t_lut[None] + phase[:, None])).sum(0)).astype(np.float32)
        max_r = radius * aspect**0.5 * float(r_lut.max())
        touch = bool(centres) and rng.random() < touch_prob
        if touch:
            j = int(rng.integers(len(centres)))
            ty, tx, tr = centres[j]
            d = rng.uniform(0.85, 1.0) * (tr + radius)
            t = rng.uniform(0, 2 * np.pi)
            cy, cx = ty + d * np.sin(t), tx + d * np.cos(t)
            others = [c for i, c in enumerate(centres) if i != j]
        else:
            cy, cx = rng.uniform(-0.1 * h, 1.1 * h), rng.uniform(-0.1 * w, 1.1 * w)
            others = centres
        if any(np.hypot(cy - oy, cx - ox) < 1.05 * (radius + orr) for oy, ox, orr in others):
            continue
        y0, y1 = max(0, int(cy - max_r) - 1), min(h, int(cy + max_r) + 2)
        x0, x1 = max(0, int(cx - max_r) - 1), min(w, int(cx + max_r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = yy_full[y0:y1, None] - np.float32(cy)
        dx = xx_full[None, x0:x1] - np.float32(cx)
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u = (dx * c + dy * s) / np.float32(radius * aspect**0.5)
        v = (-dx * s + dy * c) / np.float32(radius / aspect**0.5)
        rt = r_lut[((np.arctan2(v, u) + np.pi) * (n_lut / (2 * np.pi))).astype(np.int64)]
        inside = (u * u + v * v) <= rt * rt
        sub = label[y0:y1, x0:x1]
        new = inside & (sub == 0)
        n_new = int(new.sum())
        if n_new < max(150.0 * scale * scale, 0.4 * int(inside.sum())):
            continue
        sub[new] = len(centres) + 1
        centres.append((cy, cx, radius))
        irregular_flags.append(irregular)
        covered += n_new
    # A gland clipped by an earlier one can fall apart; keep each id's largest piece only, so every
    # id is one connected object, as in real annotations.
    for gid, sl in enumerate(ndimage.find_objects(label), start=1):
        if sl is None:
            continue
        comp, n = ndimage.label(label[sl] == gid)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            label[sl][(comp > 0) & (comp != 1 + int(np.argmax(sizes)))] = 0
    ids = np.unique(label)
    ids = ids[ids > 0]
    remap = np.zeros(len(irregular_flags), np.int32)
    remap[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    flags = np.array([False] + [irregular_flags[i] for i in ids], bool)
    return remap[label], flags


def _render(
    rng: np.random.Generator, h: int, w: int, touch_prob: float = 0.4
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Generates one (image uint8 (h, w, 3), label int32 (h, w), malignant) triple."""
    f32 = np.float32
    scale = float(np.clip(min(h, w) / 522.0, 0.15, 2.0))
    ns = f32(np.clip(scale, 0.5, 1.0))  # Nuclei shrink less than glands on tiny images.
    malignant = bool(rng.random() < 0.5)
    label, irregular = _place_glands(rng, h, w, scale, malignant, touch_prob)
    gland = label > 0

    # One distance transform serves inside and outside: distance to the nearest gland-boundary pixel
    # (a gland pixel next to another id, background included). Inside a gland that is the distance
    # to its own boundary, so touching glands each get their own rim; outside it is the distance to
    # the nearest gland. Glands cut by the frame also get a rim along it.
    edge = np.zeros((h, w), bool)
    diff_x = label[:, 1:] != label[:, :-1]
    diff_y = label[1:, :] != label[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    edge &= gland
    dist = ndimage.distance_transform_edt(~edge).astype(f32) if edge.any() else np.full((h, w), 1e6, f32)
    to_frame = np.minimum(
        np.minimum(np.arange(1, h + 1, dtype=f32), np.arange(h, 0, -1, dtype=f32))[:, None],
        np.minimum(np.arange(1, w + 1, dtype=f32), np.arange(w, 0, -1, dtype=f32))[None, :],
    )
    dist_in = np.where(gland, np.minimum(dist, to_frame), f32(0))
    dist_out = np.where(gland, f32(0), dist)

    # Per-gland rim thickness; irregular glands have thick, stratified epithelium.
    n_ids = len(irregular)
    thick = np.where(irregular, rng.uniform(20, 34, n_ids), rng.uniform(14, 24, n_ids)).astype(f32) * ns
    thick[0] = 0.0
    # One blob field drives the rim wobble (inside glands), loose stroma and the retraction gap
    # (outside): they never compete for the same pixel, and each noise field costs ~5 ms.
    blob = _smooth_noise(rng, h, w, 12.0)
    rim_t = thick[label] * (f32(1) + f32(0.25) * blob)
    lumen = gland & (dist_in > rim_t)
    epi = gland & ~lumen
    irr_px = irregular[label]

    # --- stain concentrations
    e_str = f32(rng.uniform(0.85, 1.15))  # Slide-level stain strengths.
    h_str = f32(rng.uniform(0.85, 1.15))
    fib_a = _smooth_noise(rng, h, w, (1.5, 10.0))
    fib_b = _smooth_noise(rng, h, w, (10.0, 1.5))
    mix = f32(1) / (f32(1) + np.exp(f32(-2) * _smooth_noise(rng, h, w, 40.0)))
    fibre = np.clip(f32(0.5) + f32(0.25) * (mix * fib_a + (f32(1) - mix) * fib_b), 0.0, 1.0)
    speckle = _tri_noise(rng, (h, w))
    conc_e = e_str * (f32(0.45) + f32(0.6) * fibre)
    conc_h = h_str * (f32(0.14) + f32(0.06) * fibre)
    # Loose stroma: a few pale clefts where the fibres thin out.
    loose = np.clip((blob - f32(1.6)) * f32(2), 0.0, 1.0) * (f32(1) - fibre)
    conc_e *= f32(1) - f32(0.8) * loose
    conc_h *= f32(1) - f32(0.6) * loose
    # Retraction gap: a thin white halo round some glands.
    gap_w = f32(rng.uniform(0.0, 8.0)) * ns * np.clip(blob + f32(0.5), 0.0, 1.5)
    halo = ~gland & (dist_out <= gap_w)
    conc_e = np.where(halo, f32(0.05), conc_e)
    conc_h = np.where(halo, f32(0.02), conc_h)
    # Epithelial cytoplasm: purple-pink, more haematoxylin in malignant-looking glands.
    conc_e = np.where(epi, e_str * np.where(irr_px, f32(0.6), f32(0.55)) + f32(0.05) * speckle, conc_e)
    conc_h = np.where(epi, h_str * np.where(irr_px, f32(0.38), f32(0.3)), conc_h)
    # Lumen: nearly white, some glands hold pink secretion.
    secretion = (rng.uniform(0.0, 1.0, n_ids) ** 2 * 0.3).astype(f32)[label]
    lum_tex = np.clip(f32(0.5) + f32(0.35) * _smooth_noise(rng, h, w, 2.0), 0.0, 1.0)
    conc_e = np.where(lumen, f32(0.04) + secretion * lum_tex, conc_e)
    conc_h = np.where(lumen, f32(0.02) + f32(0.2) * secretion * lum_tex, conc_h)

    # Goblet cells (clear vacuoles) in the epithelium of regular glands.
    clear = np.zeros((h, w), f32)
    gob_zone = epi & ~irr_px & (dist_in > 7.0 * ns) & (dist_in < rim_t - 3.0 * ns)
    gy, gx = _spaced_points(rng, gob_zone, 12.0 * ns)
    ga = rng.uniform(4.5, 7.5, len(gy)).astype(f32) * ns
    _stamp_ellipses(clear, gy, gx, ga, ga * rng.uniform(0.7, 1.0, len(gy)).astype(f32),
                    rng.uniform(0, np.pi, len(gy)).astype(f32), np.full(len(gy), 0.85, f32))

    # Nuclei: basal row along the rim of regular glands, crowded and stratified in irregular ones.
    gyy, gxx = np.gradient(dist_in)
    rim_reg = epi & ~irr_px & (dist_in >= 3.0 * ns) & (dist_in <= 7.0 * ns)
    rim_irr = epi & irr_px & (dist_in >= 3.0 * ns) & (dist_in <= rim_t - 4.0 * ns)
    ry, rx = _spaced_points(rng, rim_reg, 6.5 * ns)
    iy, ix = _spaced_points(rng, rim_irr, 7.5 * ns)
    ny = np.concatenate([ry, iy])
    nx = np.concatenate([rx, ix])
    n_reg, n_irr = len(ry), len(iy)
    yi, xi = ny.astype(np.int64), nx.astype(np.int64)
    across = np.arctan2(gyy[yi, xi], gxx[yi, xi]).astype(f32)  # Perpendicular to the boundary.
    across += rng.normal(0, 0.25, len(across)).astype(f32)
    na = np.concatenate([rng.uniform(4.5, 6.5, n_reg), rng.uniform(5.0, 7.5, n_irr)]).astype(f32)
    nb = np.concatenate([rng.uniform(2.2, 3.0, n_reg), rng.uniform(2.8, 4.0, n_irr)]).astype(f32)
    nv = np.concatenate([rng.uniform(0.8, 1.0, n_reg), rng.uniform(0.75, 1.05, n_irr)]).astype(f32)
    # Stromal nuclei: spindle fibroblasts and round dark lymphocytes.
    stroma = ~gland & ~halo & (dist_out > 3.0)
    sy, sx = _spaced_points(rng, stroma, float(rng.uniform(13.0, 22.0)) * ns)
    keep = rng.random(len(sy)) < 0.75
    sy, sx = sy[keep], sx[keep]
    lymph = rng.random(len(sy)) < 0.35
    sa = np.where(lymph, rng.uniform(2.8, 3.6, len(sy)), rng.uniform(5.0, 8.0, len(sy))).astype(f32)
    sb = np.where(lymph, sa * 0.9, rng.uniform(1.6, 2.4, len(sy))).astype(f32)
    sv = np.where(lymph, 1.2, rng.uniform(0.75, 1.0, len(sy))).astype(f32)
    st = rng.uniform(0, np.pi, len(sy)).astype(f32)
    nuc = np.zeros((h, w), f32)
    _stamp_ellipses(
        nuc,
        np.concatenate([ny, sy]),
        np.concatenate([nx, sx]),
        np.concatenate([na, sa]) * ns,
        np.concatenate([nb, sb]) * ns,
        np.concatenate([across, st]),
        np.concatenate([nv, sv]),
    )
    chrom = f32(1) + f32(0.15) * speckle  # Chromatin texture.
    conc_h += nuc * (h_str * f32(1.2)) * chrom
    conc_e *= f32(1) - f32(0.3) * nuc
    conc_h *= f32(1) - clear
    conc_e *= f32(1) - f32(0.85) * clear

    # Mild optical blur, applied to the two concentration maps (cheaper than to three channels).
    conc_h = ndimage.gaussian_filter(conc_h, 0.8, truncate=3.0)
    conc_e = ndimage.gaussian_filter(conc_e, 0.8, truncate=3.0)
    od = conc_h[..., None] * _H_OD + conc_e[..., None] * _E_OD
    rgb = f32(255) * np.exp(-np.maximum(od, f32(0)))
    rgb += f32(2.5) * _tri_noise(rng, rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return image, label, malignant


def make_synthetic_glands(
    num_images: int,
    height: int = 522,
    width: int = 775,
    seed: int = 0,
    name_prefix: str = "synthetic",
    touch_prob: float = 0.4,
) -> list[Example]:
    """Generates ``num_images`` H&E-like images with gland instance labels (see module docstring).

    Args:
      num_images: How many examples; image ``i`` is independent of this count.
      height, width: Image size; GlaS's usual 522x775 by default. Gland sizes scale with
        ``min(height, width) / 522`` so tiny test images still hold a few glands.
      seed: Dataset seed.
      name_prefix: Example names are ``f"{name_prefix}_{i + 1}"`` (1-based, like GlaS).
      touch_prob: chance that a new gland is placed against an earlier one (``data.synthetic_touch_prob``;
        higher values give crowded, Test-B-like images where most glands touch a neighbour).

    Returns:
      Examples with ``uint8 (H, W, 3)`` images, ``int32 (H, W)`` labels (ids 1..K, no overlaps, the
      lumen belongs to its gland), ``grade`` ``benign``/``malignant`` and a made-up ``patient`` (three
      images per patient) so patient-wise splitting can be exercised.
    """
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images must be at least 16x16, got {height}x{width}")
    out = []
    for i in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(i,)))
        image, label, malignant = _render(rng, int(height), int(width), float(touch_prob))
        out.append(
            Example(
                name=f"{name_prefix}_{i + 1}",
                image=image,
                label=label,
                grade="malignant" if malignant else "benign",
                patient=str(i // 3 + 1),
            )
        )
    return out


_SIRINUKUNWATTANA = {"benign": "healthy", "malignant": "moderately differentiated"}


def _save_label(label: np.ndarray, path: Path) -> None:
    """Writes an instance-label map losslessly: 8-bit when ids fit, else 16-bit (PNG/TIFF only)."""
    if label.min() < 0:
        raise ValueError(f"negative label ids cannot be written to {path}")
    if label.max() <= 255:
        Image.fromarray(label.astype(np.uint8), mode="L").save(path)
    elif label.max() <= 65535 and path.suffix.lower() in (".png", ".tif", ".tiff"):
        Image.fromarray(label.astype(np.uint16)).save(path)
    else:
        raise ValueError(f"{label.max()} label ids do not fit the format of {path}")


def write_glas_layout(
    examples: Sequence[Example],
    folder: str | os.PathLike,
    prefix: str = "train",
    ext: str = "bmp",
    write_grades: bool | None = None,
) -> list[Path]:
    """Writes examples as an official-layout GlaS folder: ``{prefix}_N.{ext}`` + ``{prefix}_N_anno.{ext}``.

    ``N`` is the 1-based position in ``examples`` (not the example's name), so any list becomes a
    valid split. Masks are written losslessly: with a lossy ``ext`` (jpg) they go to PNG instead,
    since a JPEG mask would no longer hold the ids. ``Grade.csv`` (official header, leading spaces
    and all, so the reader's robustness is exercised) is written when ``write_grades`` is true,
    by default only for ``prefix == "train"`` as in the data we have. Returns the image paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ext.lower().lstrip(".")
    label_ext = "png" if ext in ("jpg", "jpeg") else ext
    if write_grades is None:
        write_grades = prefix == "train"
    paths = []
    for n, ex in enumerate(examples, start=1):
        img_path = folder / f"{prefix}_{n}.{ext}"
        Image.fromarray(np.asarray(ex.image, np.uint8), mode="RGB").save(img_path)
        _save_label(np.asarray(ex.label), folder / f"{prefix}_{n}_anno.{label_ext}")
        paths.append(img_path)
    if write_grades:
        with open(folder / "Grade.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["name", "patient ID", " grade (GlaS)", " grade (Sirinukunwattana et al. 2015)"])
            for n, ex in enumerate(examples, start=1):
                grade = ex.grade or ""
                wr.writerow(
                    [f"{prefix}_{n}", ex.patient or "", f" {grade}", f" {_SIRINUKUNWATTANA.get(grade, '')}"]
                )
    return paths
