"""Times :func:`micronet_jax.metrics.glas_metrics` on a synthetic Test-A-sized set (60 x 522x775).

Why: the metric must stay cheap enough to run at every validation step; this gives a reproducible
number. GT glands are random ellipses; predictions are perturbed copies (shifted, grown or shrunk,
some dropped, some split, a few false-positive specks), so every code path (matched, split, unmatched,
min-Hausdorff search) is exercised.

Run: ``python -m micronet_jax.tools.time_metrics [--num-images 60] [--glands 15] [--seed 0]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from micronet_jax.metrics import glas_metrics


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    """Boolean mask of a rotated ellipse, evaluated only on its bounding box (fast)."""
    h, w = shape
    r = int(np.ceil(max(ry, rx))) + 1
    y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 1)
    x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    c, s = np.cos(angle), np.sin(angle)
    u = ((yy - cy) * c + (xx - cx) * s) / ry
    v = (-(yy - cy) * s + (xx - cx) * c) / rx
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = u * u + v * v <= 1.0
    return out


def make_pair(rng: np.random.Generator, shape: tuple[int, int] = (522, 775),
              glands: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (prediction, ground truth) pair of instance label images."""
    gt = np.zeros(shape, np.int32)
    pred = np.zeros(shape, np.int32)
    next_id = 1
    for k in range(1, glands + 1):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(15, 60), rng.uniform(15, 60)
        ang = rng.uniform(0, np.pi)
        g = _ellipse(shape, cy, cx, ry, rx, ang)
        gt[g & (gt == 0)] = k
        u = rng.random()
        if u < 0.1:
            continue  # missed gland (FN)
        f = rng.uniform(0.7, 1.2)
        p = _ellipse(shape, cy + rng.normal(0, 5), cx + rng.normal(0, 5), ry * f, rx * f,
                     ang + rng.normal(0, 0.2))
        if u < 0.2:  # split into two halves
            yy = np.arange(shape[0])[:, None]
            pred[p & (yy < cy) & (pred == 0)] = next_id
            pred[p & (yy >= cy) & (pred == 0)] = next_id + 1
            next_id += 2
        else:
            pred[p & (pred == 0)] = next_id
            next_id += 1
    for _ in range(rng.integers(0, 4)):  # false-positive specks
        spot = _ellipse(shape, rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), 6, 6, 0.0)
        pred[spot & (pred == 0)] = next_id
        next_id += 1
    # Ragged boundaries, as a thresholded network output would have.
    noise = ndimage.binary_opening(rng.random(shape) < 0.02)
    pred[noise] = 0
    return pred, gt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=60)
    ap.add_argument("--glands", type=int, default=15)
    ap.add_argument("--height", type=int, default=522)
    ap.add_argument("--width", type=int, default=775)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    pairs = [make_pair(rng, (args.height, args.width), args.glands) for _ in range(args.num_images)]
    preds, gts = zip(*pairs)
    n_pred = sum(len(np.unique(p)) - 1 for p in preds)
    n_gt = sum(len(np.unique(g)) - 1 for g in gts)
    t0 = time.perf_counter()
    m = glas_metrics(preds, gts)
    dt = time.perf_counter() - t0
    print(f"{args.num_images} images of {args.height}x{args.width}, {n_gt} GT / {n_pred} predicted objects")
    print(f"pooled: F1={m['f1']:.4f} ObjDice={m['object_dice']:.4f} "
          f"ObjHausdorff={m['object_hausdorff']:.3f} (tp={m['tp']} fp={m['fp']} fn={m['fn']})")
    print(f"glas_metrics time: {dt:.2f} s ({1000 * dt / max(args.num_images, 1):.1f} ms/image)")


if __name__ == "__main__":
    main()
