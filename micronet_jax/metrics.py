"""GlaS object-level metrics (F1, Object Dice, Object Hausdorff) plus pixel Dice/IoU.

Implemented from ``docs/glas_metrics.md`` (the challenge definitions). Choices that matter, and why:

* Labels are used exactly as given (no connected-component relabelling), ids may be any non-negative
  integer (no ``uint8`` wrap-around), background (0) is never a partner, and overlap ties go to the
  smallest id, because that is what the official MATLAB scripts do.
* Every overlap rule reads one S-id x G-id contingency matrix built with ``np.bincount`` per image, so the
  detection and Dice parts cost O(pixels) per image.
* Hausdorff distances are exact: ``distance_transform_edt`` on the bounding box of A u B. Objects with no
  overlap take the min-Hausdorff partner; an exact lower bound from bounding boxes prunes that search
  (so noisy predictions with hundreds of specks stay fast). A side with no objects gives +inf, never a finite sentinel.
* ``mode="pooled"`` (default) is the challenge definition: TP/FP/FN and the area-weighted Dice/Hausdorff
  sums are accumulated over the images of one test part and divided once. ``mode="mean"`` averages
  per-image values (a common, but different, number).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["ERROR_KINDS", "glas_metrics", "image_stats", "per_image_metrics"]

_MODES = ("pooled", "mean")
_FN_RULES = ("default", "v5")
_THRESHOLD_RULES = ("strict", ">=")

# Dense id lookup tables are used up to this id; beyond it np.unique is used (ids are still exact).
_DENSE_ID_LIMIT = 1 << 22


# ---------------------------------------------------------------------------------------------- helpers


def _check_rules(fn_rule: str, threshold_rule: str) -> None:
    """Fails early on a misspelt variant, so a typo never silently selects the default rule."""
    if fn_rule not in _FN_RULES:
        raise ValueError(f"fn_rule must be one of {_FN_RULES}, got {fn_rule!r}")
    if threshold_rule not in _THRESHOLD_RULES:
        raise ValueError(f"threshold_rule must be one of {_THRESHOLD_RULES}, got {threshold_rule!r}")


def _as_label_image(arr: Any, name: str) -> np.ndarray:
    """Validates a label image without changing its ids (no casting to a narrower type)."""
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image, got shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype (instance ids), got {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ValueError(f"{name} has negative ids; 0 is background and objects are positive ids")
    return a


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps ids to 0..n (0 = background) so arrays are sized by object count, not by the largest id.

    Returns (compact image as intp, sorted original ids of objects 1..n).
    """
    flat = labels.ravel()
    max_id = int(flat.max()) if flat.size else 0
    if max_id == 0:
        return np.zeros(labels.shape, np.intp), np.zeros(0, np.int64)
    if max_id < _DENSE_ID_LIMIT:
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=max_id + 1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(max_id + 1, np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat].reshape(labels.shape), ids.astype(np.int64)
    uniq, inv = np.unique(flat, return_inverse=True)
    if uniq[0] == 0:
        return inv.reshape(labels.shape).astype(np.intp), uniq[1:].astype(np.int64)
    return (inv + 1).reshape(labels.shape).astype(np.intp), uniq.astype(np.int64)


def _contingency(s_c: np.ndarray, g_c: np.ndarray, n_s: int, n_g: int) -> np.ndarray:
    """(n_s+1) x (n_g+1) overlap counts; row/column 0 are background."""
    idx = s_c.ravel() * (n_g + 1) + g_c.ravel()
    return np.bincount(idx, minlength=(n_s + 1) * (n_g + 1)).reshape(n_s + 1, n_g + 1)


def _detection_and_dice(
    cont: np.ndarray, fn_rule: str, threshold_rule: str
) -> dict[str, Any]:
    """F1 counts and area-weighted Dice sums from a contingency matrix (no pixels needed).

    Kept separate from the Hausdorff part so post-processing tuning can rescore many candidate label
    images cheaply from one contingency matrix.
    """
    ov = cont[1:, 1:]  # object x object overlaps, background excluded from partner candidates
    n_s, n_g = ov.shape
    s_area = cont[1:, :].sum(axis=1)
    g_area = cont[:, 1:].sum(axis=0)

    # S side: partner = argmax over GT columns (np.argmax returns the first max = smallest id).
    if n_g:
        s_partner = np.argmax(ov, axis=1) if n_s else np.zeros(0, np.intp)
        s_best = ov[np.arange(n_s), s_partner] if n_s else np.zeros(0, np.int64)
    else:
        s_partner = np.zeros(n_s, np.intp)
        s_best = np.zeros(n_s, np.int64)
    s_has = s_best > 0
    if n_s and n_g:
        partner_area = g_area[s_partner]
        if threshold_rule == "strict":
            is_tp = s_has & (2 * s_best > partner_area)
        else:
            is_tp = s_has & (2 * s_best >= partner_area)
    else:
        is_tp = np.zeros(n_s, bool)
    tp = int(is_tp.sum())
    fp = n_s - tp
    if fn_rule == "v5":
        claimed = np.unique(s_partner[s_has]).size
        fn = n_g - claimed
    else:
        # Distinct GT objects with a TP; equals TP under the strict rule (at most one TP per GT).
        fn = n_g - np.unique(s_partner[is_tp]).size

    s_dice = np.zeros(n_s)
    if n_s and n_g:
        s_dice = np.where(s_has, 2.0 * s_best / (s_area + g_area[s_partner]), 0.0)

    if n_s:
        g_partner = np.argmax(ov, axis=0) if n_g else np.zeros(0, np.intp)
        g_best = ov[g_partner, np.arange(n_g)] if n_g else np.zeros(0, np.int64)
    else:
        g_partner = np.zeros(n_g, np.intp)
        g_best = np.zeros(n_g, np.int64)
    g_has = g_best > 0
    g_dice = np.zeros(n_g)
    if n_s and n_g:
        g_dice = np.where(g_has, 2.0 * g_best / (g_area + s_area[g_partner]), 0.0)

    return {
        "n_s": n_s,
        "n_g": n_g,
        "tp": tp,
        "fp": fp,
        "fn": int(fn),
        "s_area": s_area,
        "g_area": g_area,
        "s_partner": s_partner,
        "s_has": s_has,
        "is_tp": is_tp,
        "g_partner": g_partner,
        "g_has": g_has,
        "s_dice_sum": float(np.dot(s_area, s_dice)),
        "g_dice_sum": float(np.dot(g_area, g_dice)),
    }


# Kinds of error, as counted by image_stats (each pools by summation). A missed gland's best object covers
# less than this share of it; between this and the TP rule's half it is under-covered.
MISSED_COVERAGE = 0.2
ERROR_KINDS = ("fn_missed", "fn_merged", "fn_undercovered", "fp_background", "fp_fragment", "fp_unmatched")


def _error_kinds(cont: np.ndarray, d: dict[str, Any]) -> dict[str, int]:
    """Why each unmatched gland and each false object is one: what to fix next, read from the counts.

    A ground-truth gland with no TP object is *missed* (no object covers ``MISSED_COVERAGE`` of it),
    *merged* (the object covering most of it is a TP of another gland: two glands joined into one
    object) or *under-covered* (an object covers part of it, but not the half the TP rule asks). A false
    object lies on *background* (it overlaps no gland), is a *fragment* of a gland another object
    matched, or lies over an *unmatched* gland (the other side of an under-covered one). The FN kinds
    sum to FN under the default ``fn_rule`` (the v5 rule counts FN differently), the FP kinds to FP.
    """
    ov = cont[1:, 1:]
    n_s, n_g = ov.shape
    out = dict.fromkeys(ERROR_KINDS, 0)
    is_tp = d["is_tp"]
    matched = np.zeros(n_g, bool)
    matched[d["s_partner"][is_tp]] = True
    for j in np.flatnonzero(~matched):
        if not d["g_has"][j]:  # no object overlaps it (also when there are no objects)
            out["fn_missed"] += 1
            continue
        i = int(d["g_partner"][j])
        if ov[i, j] < MISSED_COVERAGE * d["g_area"][j]:
            out["fn_missed"] += 1
        elif is_tp[i]:
            out["fn_merged"] += 1
        else:
            out["fn_undercovered"] += 1
    for i in np.flatnonzero(~is_tp):
        if not d["s_has"][i]:
            out["fp_background"] += 1
        elif matched[d["s_partner"][i]]:
            out["fp_fragment"] += 1
        else:
            out["fp_unmatched"] += 1
    return out


def _union_box(a: tuple[slice, slice], b: tuple[slice, slice]) -> tuple[slice, slice]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore[return-value]


class _Hausdorff:
    """Exact pairwise Hausdorff distances between objects of two compact label images, with a cache.

    The cache matters because the S->G and G->S partner of a matched pair is usually the same pair.
    """

    def __init__(self, s_c: np.ndarray, g_c: np.ndarray, n_s: int, n_g: int) -> None:
        self.s_c, self.g_c = s_c, g_c
        self.s_box = ndimage.find_objects(s_c, max_label=n_s)
        self.g_box = ndimage.find_objects(g_c, max_label=n_g)
        self.cache: dict[tuple[int, int], float] = {}

    def pair(self, i: int, j: int) -> float:
        """H(S_i, G_j) for 0-based object indices, on the bounding box of their union (exact)."""
        key = (i, j)
        if key not in self.cache:
            box = _union_box(self.s_box[i], self.g_box[j])
            a = self.s_c[box] == i + 1
            b = self.g_c[box] == j + 1
            h_ab = float(ndimage.distance_transform_edt(~b)[a].max())
            h_ba = float(ndimage.distance_transform_edt(~a)[b].max())
            self.cache[key] = max(h_ab, h_ba)
        return self.cache[key]

    @staticmethod
    def _box_array(boxes: list) -> np.ndarray:
        """(n, 4) inclusive pixel extents: top, bottom, left, right."""
        return np.array([[b[0].start, b[0].stop - 1, b[1].start, b[1].stop - 1] for b in boxes],
                        dtype=np.int64).reshape(-1, 4)

    def _min_partner(self, box: tuple[slice, slice], other_boxes: list, pair_fn) -> float:
        """Min over the other side of H, ties to the smallest id, pruned by an exact lower bound.

        Lower bound from bounding boxes: if B's top row lies t rows above A's, that B pixel is >= t
        from all of A, so H(A, B) >= max |extent differences| over the four box sides. Candidates are
        evaluated exactly in increasing bound order until the bound exceeds the best distance found.
        """
        a = self._box_array([box])
        lower = np.abs(self._box_array(other_boxes) - a).max(axis=1).astype(float)
        best, best_j = math.inf, -1
        for j in np.lexsort((np.arange(lower.size), lower)):
            if lower[j] > best:
                break
            h = pair_fn(int(j))
            if h < best or (h == best and j < best_j):
                best, best_j = h, int(j)
        return best

    def s_unmatched(self, i: int, n_g: int) -> float:
        if n_g == 0:
            return math.inf
        return self._min_partner(self.s_box[i], self.g_box,
                                 lambda j: self.pair(i, j))

    def g_unmatched(self, j: int, n_s: int) -> float:
        if n_s == 0:
            return math.inf
        return self._min_partner(self.g_box[j], self.s_box,
                                 lambda i: self.pair(i, j))


def _side_term(weighted_sum: float, total_area: float) -> float:
    return weighted_sum / total_area if total_area > 0 else 0.0


def _combine(s_sum: float, s_tot: float, g_sum: float, g_tot: float, *, hausdorff: bool) -> float:
    """½(S side + G side), with the §7 conventions for empty sides (no epsilons, no sentinels)."""
    if s_tot == 0 and g_tot == 0:
        return 0.0 if hausdorff else 1.0
    if hausdorff and (s_tot == 0 or g_tot == 0):
        return math.inf
    return 0.5 * (_side_term(s_sum, s_tot) + _side_term(g_sum, g_tot))


def _f1(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def _precision_recall(tp: int, fp: int, fn: int) -> tuple[float, float]:
    """0/0 cases: 1 when the other side is empty too (nothing to find, nothing found), else 0."""
    p = tp / (tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0)
    r = tp / (tp + fn) if tp + fn else (1.0 if fp == 0 else 0.0)
    return p, r


def _pixel_scores(inter: int, n_pred: int, n_gt: int) -> tuple[float, float]:
    union = n_pred + n_gt - inter
    dice = 1.0 if n_pred + n_gt == 0 else 2.0 * inter / (n_pred + n_gt)
    iou = 1.0 if union == 0 else inter / union
    return dice, iou


# ---------------------------------------------------------------------------------------------- public


def image_stats(
    pred: np.ndarray,
    gt: np.ndarray,
    fn_rule: str = "default",
    threshold_rule: str = "strict",
    hausdorff: bool = True,
) -> dict[str, Any]:
    """Per-image accumulators (plain Python numbers) that pool by summation, plus per-image scores.

    Returned so evaluation can write one CSV row per image and pool by summing columns. Keys:
    ``tp, fp, fn, n_pred, n_gt`` (object counts), ``pred_area, gt_area`` (total object areas),
    ``pred_dice_sum, gt_dice_sum`` (Σ area·Dice per side), ``pred_haus_sum, gt_haus_sum``
    (Σ area·H per side, may be +inf), ``pixel_inter, pixel_pred, pixel_gt`` (foreground pixels), and the
    per-image ``f1, dice, hausdorff, precision, recall, pixel_dice, pixel_iou``, and the counts of each
    kind of error (``ERROR_KINDS``, see :func:`_error_kinds`).
    ``hausdorff=False`` skips the (costly) distance part and reports NaN for it.
    """
    _check_rules(fn_rule, threshold_rule)
    pred = _as_label_image(pred, "pred")
    gt = _as_label_image(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")

    s_c, _ = _compact(pred)
    g_c, _ = _compact(gt)
    n_s = int(s_c.max()) if s_c.size else 0
    n_g = int(g_c.max()) if g_c.size else 0
    cont = _contingency(s_c, g_c, n_s, n_g)
    d = _detection_and_dice(cont, fn_rule, threshold_rule)

    s_area, g_area = d["s_area"], d["g_area"]
    s_tot, g_tot = int(s_area.sum()), int(g_area.sum())

    if hausdorff:
        hd = _Hausdorff(s_c, g_c, n_s, n_g)
        s_h = np.empty(n_s)
        for i in range(n_s):
            s_h[i] = hd.pair(i, int(d["s_partner"][i])) if d["s_has"][i] else hd.s_unmatched(i, n_g)
        g_h = np.empty(n_g)
        for j in range(n_g):
            g_h[j] = hd.pair(int(d["g_partner"][j]), j) if d["g_has"][j] else hd.g_unmatched(j, n_s)
        s_haus_sum = float(np.dot(s_area, s_h)) if n_s else 0.0
        g_haus_sum = float(np.dot(g_area, g_h)) if n_g else 0.0
        haus = _combine(s_haus_sum, s_tot, g_haus_sum, g_tot, hausdorff=True)
    else:
        s_haus_sum = g_haus_sum = haus = math.nan

    inter = int(cont[1:, 1:].sum())
    pix_pred, pix_gt = s_tot, g_tot
    p, r = _precision_recall(d["tp"], d["fp"], d["fn"])
    pdice, piou = _pixel_scores(inter, pix_pred, pix_gt)
    return {
        "tp": d["tp"],
        "fp": d["fp"],
        "fn": d["fn"],
        "n_pred": n_s,
        "n_gt": n_g,
        "pred_area": s_tot,
        "gt_area": g_tot,
        "pred_dice_sum": d["s_dice_sum"],
        "gt_dice_sum": d["g_dice_sum"],
        "pred_haus_sum": s_haus_sum,
        "gt_haus_sum": g_haus_sum,
        "pixel_inter": inter,
        "pixel_pred": pix_pred,
        "pixel_gt": pix_gt,
        "f1": _f1(d["tp"], d["fp"], d["fn"]),
        "dice": _combine(d["s_dice_sum"], s_tot, d["g_dice_sum"], g_tot, hausdorff=False),
        "hausdorff": haus,
        "precision": p,
        "recall": r,
        "pixel_dice": pdice,
        "pixel_iou": piou,
        **_error_kinds(cont, d),
    }


def per_image_metrics(
    pred: np.ndarray, gt: np.ndarray, fn_rule: str = "default", threshold_rule: str = "strict"
) -> dict[str, Any]:
    """The three GlaS scores and the counts for one image (the per-image row of a report)."""
    return per_image_row(image_stats(pred, gt, fn_rule=fn_rule, threshold_rule=threshold_rule))


def per_image_row(stats: dict[str, Any]) -> dict[str, Any]:
    """The per-image report columns out of one :func:`image_stats` result."""
    return {k: stats[k] for k in ("f1", "dice", "hausdorff", "tp", "fp", "fn", *ERROR_KINDS)}


def aggregate_stats(
    stats: Sequence[dict[str, Any]],
    mode: str = "pooled",
    fn_rule: str = "default",
    threshold_rule: str = "strict",
) -> dict[str, Any]:
    """Combines :func:`image_stats` dicts into dataset scores (pooled = challenge definition).

    ``fn_rule`` and ``threshold_rule`` are the rules the stats were computed with; they are echoed
    in the result, as :func:`glas_metrics` does.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    tot = {k: sum(s[k] for s in stats) for k in (
        "tp", "fp", "fn", "n_pred", "n_gt", "pred_area", "gt_area", "pred_dice_sum", "gt_dice_sum",
        "pred_haus_sum", "gt_haus_sum", "pixel_inter", "pixel_pred", "pixel_gt")}
    # Stats made before the error kinds existed (or by other code) may lack them; they count as absent.
    kinds = {k: int(sum(s[k] for s in stats)) for k in ERROR_KINDS if all(k in s for s in stats)}
    out: dict[str, Any] = {
        "mode": mode,
        "tp": int(tot["tp"]),
        "fp": int(tot["fp"]),
        "fn": int(tot["fn"]),
        "num_images": len(stats),
        "num_empty_pred": sum(1 for s in stats if s["n_gt"] > 0 and s["n_pred"] == 0),
        "num_empty_gt": sum(1 for s in stats if s["n_pred"] > 0 and s["n_gt"] == 0),
        **kinds,
    }
    if mode == "pooled":
        out["f1"] = _f1(out["tp"], out["fp"], out["fn"])
        out["precision"], out["recall"] = _precision_recall(out["tp"], out["fp"], out["fn"])
        out["object_dice"] = _combine(tot["pred_dice_sum"], tot["pred_area"], tot["gt_dice_sum"],
                                      tot["gt_area"], hausdorff=False)
        out["object_hausdorff"] = _combine(tot["pred_haus_sum"], tot["pred_area"], tot["gt_haus_sum"],
                                           tot["gt_area"], hausdorff=True)
        out["pixel_dice"], out["pixel_iou"] = _pixel_scores(
            tot["pixel_inter"], tot["pixel_pred"], tot["pixel_gt"])
    else:
        n = max(len(stats), 1)
        def mean(key: str) -> float:
            return float(sum(s[key] for s in stats) / n) if stats else math.nan
        out["f1"] = mean("f1")
        out["precision"] = mean("precision")
        out["recall"] = mean("recall")
        out["object_dice"] = mean("dice")
        out["object_hausdorff"] = mean("hausdorff")
        out["pixel_dice"] = mean("pixel_dice")
        out["pixel_iou"] = mean("pixel_iou")
    out["fn_rule"] = fn_rule
    out["threshold_rule"] = threshold_rule
    return out


def glas_metrics(
    pred_labels: Sequence[np.ndarray],
    gt_labels: Sequence[np.ndarray],
    mode: str = "pooled",
    fn_rule: str = "default",
    threshold_rule: str = "strict",
) -> dict[str, Any]:
    """GlaS F1 / Object Dice / Object Hausdorff over one test part (never mix Test A and Test B).

    ``mode``: "pooled" (challenge definition) or "mean" (per-image average). ``fn_rule``: "default"
    (FN = n_G - TP) or "v5" (MATLAB v5: FN = GT objects that are nobody's max-overlap partner).
    ``threshold_rule``: "strict" (> 0.5, official code) or ">=" (the page's "at least 50%").
    Hausdorff is +inf whenever some image has objects on one side only; ``num_empty_pred`` says how many
    images had GT objects but an empty prediction. The rules used are echoed in the result.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    _check_rules(fn_rule, threshold_rule)
    pred_labels, gt_labels = list(pred_labels), list(gt_labels)
    if len(pred_labels) != len(gt_labels):
        raise ValueError(
            f"got {len(pred_labels)} prediction images but {len(gt_labels)} ground-truth images")
    stats = []
    for k, (p, g) in enumerate(zip(pred_labels, gt_labels)):
        p, g = np.asarray(p), np.asarray(g)
        if p.shape != g.shape:
            raise ValueError(f"image {k}: prediction shape {p.shape} != ground-truth shape {g.shape}")
        try:
            stats.append(image_stats(p, g, fn_rule=fn_rule, threshold_rule=threshold_rule))
        except ValueError as e:
            raise ValueError(f"image {k}: {e}") from e
    return aggregate_stats(stats, mode=mode, fn_rule=fn_rule, threshold_rule=threshold_rule)
