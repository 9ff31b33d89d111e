"""Post-processing: probability map -> instances, and the grid search on validation images."""

from __future__ import annotations

import numpy as np
import pytest

from micronet_jax.metrics import glas_metrics
from micronet_jax.postprocess import contour_to_instances, probability_to_instances, tune_postprocess


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A probability map with a ring (hole), a faint blob, and a small speck; plus its GT."""
    p = np.zeros((60, 80), np.float32)
    gt = np.zeros((60, 80), np.int32)
    p[5:25, 5:25] = 0.9
    p[12:18, 12:18] = 0.1  # hole inside the first gland
    gt[5:25, 5:25] = 1
    p[30:55, 40:75] = 0.6  # faint gland: lost at threshold 0.7
    gt[30:55, 40:75] = 2
    p[50:55, 5:10] = 0.95  # 25-px speck, not in GT
    return p, gt


def test_probability_to_instances_basic() -> None:
    p, _ = _scene()
    lab = probability_to_instances(p, threshold=0.5, min_size=30)
    assert lab.dtype == np.int32 and lab.shape == p.shape
    assert sorted(np.unique(lab)) == [0, 1, 2]  # speck removed, ids consecutive
    assert (lab[5:25, 5:25] > 0).all()  # hole filled
    lab = probability_to_instances(p, threshold=0.5, fill_holes=False, min_size=0)
    assert (lab[12:18, 12:18] == 0).all()
    assert len(np.unique(lab)) - 1 == 3


def test_threshold_is_strict_and_min_size_inclusive() -> None:
    p = np.zeros((10, 10), np.float32)
    p[2:5, 2:5] = 0.5
    assert probability_to_instances(p, threshold=0.5, min_size=0).max() == 0
    p[2:5, 2:5] = 0.51
    assert probability_to_instances(p, threshold=0.5, min_size=9).max() == 1
    assert probability_to_instances(p, threshold=0.5, min_size=10).max() == 0


def test_eight_connectivity() -> None:
    p = np.zeros((6, 6), np.float32)
    p[1:3, 1:3] = 1
    p[3:5, 3:5] = 1  # touches diagonally
    assert probability_to_instances(p, min_size=0).max() == 1


def test_opening_breaks_thin_bridge() -> None:
    p = np.zeros((30, 50), np.float32)
    p[5:25, 2:20] = 1
    p[5:25, 30:48] = 1
    p[14:16, 20:30] = 1  # 2-px bridge
    assert probability_to_instances(p, min_size=0).max() == 1
    assert probability_to_instances(p, opening_radius=2, min_size=0).max() == 2


def test_tune_postprocess_picks_best_and_matches_direct_scoring() -> None:
    p, gt = _scene()
    p2, gt2 = np.flip(p, 1).copy(), np.flip(gt, 1).copy()
    thresholds, min_sizes, radii = (0.5, 0.7), (0, 30, 2000), (0, 1)
    best, rows = tune_postprocess([p, p2], [gt, gt2], thresholds, min_sizes, radii)
    assert len(rows) == len(thresholds) * len(min_sizes) * len(radii)
    assert best["threshold"] == 0.5 and best["min_size"] == 30 and best["opening_radius"] == 0
    # Every row equals the full metric on the directly post-processed images.
    for r in rows:
        kw = {k: r[k] for k in ("threshold", "min_size", "opening_radius", "fill_holes")}
        preds = [probability_to_instances(x, **kw) for x in (p, p2)]
        m = glas_metrics(preds, [gt, gt2])
        assert (r["tp"], r["fp"], r["fn"]) == (m["tp"], m["fp"], m["fn"])
        assert r["f1"] == pytest.approx(m["f1"])
        assert r["object_dice"] == pytest.approx(m["object_dice"])
    # best is directly usable as keyword arguments.
    assert probability_to_instances(p, **best).max() == 2


def test_tune_postprocess_tie_break_by_dice() -> None:
    # Both thresholds find the single gland (same F1); the lower one matches its extent exactly.
    p = np.zeros((40, 40), np.float32)
    p[5:35, 5:35] = 0.6
    p[7:33, 7:33] = 0.9  # 676 of 900 px: still a TP
    gt = np.zeros((40, 40), np.int32)
    gt[5:35, 5:35] = 1
    best, rows = tune_postprocess([p], [gt], thresholds=(0.8, 0.5), min_sizes=(0,))
    assert rows[0]["f1"] == rows[1]["f1"] == 1.0
    assert best["threshold"] == 0.5


def test_tune_postprocess_validates() -> None:
    p, gt = _scene()
    with pytest.raises(ValueError, match="probability maps"):
        tune_postprocess([p], [gt, gt], (0.5,), (0,))
    with pytest.raises(ValueError, match="image 0"):
        tune_postprocess([p[:10]], [gt], (0.5,), (0,))


def _frame_sliver_scene() -> tuple[np.ndarray, np.ndarray]:
    """A whole gland, a 40-px sliver of a gland cut by the top edge (in GT) and a 36-px speck in the
    middle (not in GT), as p(gland) and GT."""
    p = np.zeros((50, 60), np.float32)
    gt = np.zeros((50, 60), np.int32)
    p[20:40, 5:25] = gt[20:40, 5:25] = 1
    p[0:4, 40:50] = 0.9
    gt[0:4, 40:50] = 2
    p[22:28, 40:46] = 0.9
    return p, gt


def test_border_min_size_keeps_glands_cut_by_the_frame() -> None:
    p, gt = _frame_sliver_scene()
    assert probability_to_instances(p, min_size=100).max() == 1  # min_size drops sliver and speck
    lab = probability_to_instances(p, min_size=100, border_min_size=20)
    assert lab.max() == 2 and (lab[0:4, 40:50] > 0).all() and (lab[22:28, 40:46] == 0).all()
    assert glas_metrics([lab], [gt])["f1"] == 1.0
    # None is min_size; a border minimum above min_size drops small frame objects only.
    np.testing.assert_array_equal(probability_to_instances(p, min_size=100, border_min_size=None),
                                  probability_to_instances(p, min_size=100))
    lab = probability_to_instances(p, min_size=0, border_min_size=41)
    assert lab.max() == 2 and (lab[0:4, 40:50] == 0).all()
    # The three-class path takes the same key.
    three = np.stack([1 - p, p, np.zeros_like(p)], -1)
    assert contour_to_instances(three, min_size=100, min_marker_size=0, border_min_size=20).max() == 2
    with pytest.raises(ValueError, match="border_min_size"):
        probability_to_instances(p, border_min_size=-1)


def test_tune_postprocess_searches_border_min_size() -> None:
    p, gt = _frame_sliver_scene()
    best, rows = tune_postprocess([p], [gt], thresholds=(0.5,), min_sizes=(0, 100),
                                  border_min_sizes=(None, 20))
    # None is reported as min_size itself, so a tuned flag overrides a config's own border_min_size.
    assert [(r["min_size"], r["border_min_size"]) for r in rows] == [(0, 0), (0, 20), (100, 100), (100, 20)]
    for r in rows:  # each row is the metric of the directly post-processed image
        lab = probability_to_instances(p, min_size=r["min_size"], border_min_size=r["border_min_size"])
        m = glas_metrics([lab], [gt])
        assert (r["tp"], r["fp"], r["fn"]) == (m["tp"], m["fp"], m["fn"])
    assert (best["min_size"], best["border_min_size"]) == (100, 20) and rows[3]["f1"] == 1.0
    with pytest.raises(ValueError, match="border_min_sizes"):
        tune_postprocess([p], [gt], (0.5,), (0,), border_min_sizes=(-5,))


def _two_touching_discs() -> tuple[np.ndarray, np.ndarray]:
    """Two discs of radius 20 whose centres are 34 px apart (a 21-px neck), as p(gland) and GT."""
    yy, xx = np.mgrid[:60, :100]
    a = (yy - 30) ** 2 + (xx - 30) ** 2 <= 20 ** 2
    b = (yy - 30) ** 2 + (xx - 64) ** 2 <= 20 ** 2
    gt = np.zeros((60, 100), np.int32)
    gt[a] = 1
    gt[b & ~a] = 2
    return (a | b).astype(np.float32), gt


def test_split_distance_separates_glands_joined_by_a_neck() -> None:
    p, gt = _two_touching_discs()
    assert probability_to_instances(p, min_size=0).max() == 1  # connected components merge them
    lab = probability_to_instances(p, min_size=0, split_distance=3)
    assert lab.max() == 2 and (lab > 0).sum() == (p > 0.5).sum()  # split, nothing lost
    assert glas_metrics([lab], [gt])["f1"] == 1.0
    # A lone disc and a neck-free bar stay one object each; an empty map stays empty.
    yy, xx = np.mgrid[:60, :100]
    one = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 20 ** 2).astype(np.float32)
    assert probability_to_instances(one, min_size=0, split_distance=3).max() == 1
    bar = np.zeros((60, 100), np.float32)
    bar[20:40, 5:95] = 1
    assert probability_to_instances(bar, min_size=0, split_distance=3).max() == 1
    assert probability_to_instances(np.zeros((8, 8), np.float32), split_distance=3).max() == 0
    with pytest.raises(ValueError, match="split_distance"):
        probability_to_instances(p, split_distance=-1)


def test_tune_postprocess_searches_split_distance() -> None:
    p, gt = _two_touching_discs()
    best, rows = tune_postprocess([p], [gt], thresholds=(0.5,), min_sizes=(0,), split_distances=(0, 3))
    assert [r["split_distance"] for r in rows] == [0.0, 3.0]
    assert (rows[0]["tp"], rows[1]["tp"]) == (1, 2)
    assert best["split_distance"] == 3.0 and probability_to_instances(p, **best).max() == 2


def _two_glands_with_a_dip() -> tuple[np.ndarray, np.ndarray]:
    """Two 20x30 glands side by side, p = 0.95, touching along a 4-px band where p dips to 0.6: above
    the 0.5 threshold, so connected components merge them, though the model saw the gap."""
    p = np.zeros((40, 80), np.float32)
    p[10:30, 8:72] = 0.95
    p[10:30, 38:42] = 0.6
    gt = np.zeros((40, 80), np.int32)
    gt[10:30, 8:40] = 1
    gt[10:30, 40:72] = 2
    return p, gt


def test_split_threshold_separates_glands_where_their_probability_dips() -> None:
    p, gt = _two_glands_with_a_dip()
    assert probability_to_instances(p, min_size=0).max() == 1  # connected components merge them
    lab = probability_to_instances(p, min_size=0, split_threshold=0.8)
    assert lab.max() == 2 and (lab > 0).sum() == (p > 0.5).sum()  # split at the dip, nothing lost
    assert glas_metrics([lab], [gt])["f1"] == 1.0
    # Seeds above the dip's level join: one object again. Seeds smaller than min_marker_size are
    # dropped, and a gland left without one stays an object (not lost to the background).
    assert probability_to_instances(p, min_size=0, split_threshold=0.5).max() == 1
    q = p.copy()
    q[12:14, 10:12] = q[12:14, 60:62] = 0.99  # a 4-px peak in each gland: the seeds at 0.97
    assert probability_to_instances(q, min_size=0, split_threshold=0.97).max() == 2
    unseeded = probability_to_instances(q, min_size=0, split_threshold=0.97, min_marker_size=5)
    assert unseeded.max() == 1 and (unseeded > 0).sum() == (q > 0.5).sum()
    # Smoothing merges a narrow dip into its neighbours: a 4-px band at sigma 4 no longer splits.
    assert probability_to_instances(p, min_size=0, split_threshold=0.8, marker_sigma=4).max() == 1
    with pytest.raises(ValueError, match="split_threshold"):
        probability_to_instances(p, split_threshold=1.5)
    with pytest.raises(ValueError, match="choose one way"):
        probability_to_instances(p, split_threshold=0.8, split_distance=3)


def test_tune_postprocess_searches_split_thresholds() -> None:
    # 0 (connected components) merges the two glands; 0.8 seeds each above the dip; 0.5 seeds the
    # whole mask as one. The tuner searches them as its third axis and its best row reproduces.
    p, gt = _two_glands_with_a_dip()
    best, rows = tune_postprocess([p], [gt], thresholds=(0.5,), min_sizes=(0,),
                                  split_thresholds=(0.0, 0.5, 0.8), min_marker_size=5)
    assert [(r["split_threshold"], r["split_distance"], r["tp"]) for r in rows] == \
        [(0.0, 0.0, 1), (0.5, 0.0, 1), (0.8, 0.0, 2)]
    assert best["split_threshold"] == 0.8 and best["min_marker_size"] == 5
    np.testing.assert_array_equal(probability_to_instances(p, **best),
                                  probability_to_instances(p, min_size=0, split_threshold=0.8,
                                                           min_marker_size=5))
    with pytest.raises(ValueError, match="split_distances"):
        tune_postprocess([p], [gt], (0.5,), (0,), split_thresholds=(0.8,), split_distances=(0, 3))
    with pytest.raises(ValueError, match="split_thresholds must be in"):
        tune_postprocess([p], [gt], (0.5,), (0,), split_thresholds=(1.2,))


def test_tune_postprocess_in_worker_processes_gives_the_same_rows(caplog, monkeypatch) -> None:
    # The grid in 2 spawned processes (what a 16-core GPU host does by default) against in-process,
    # for the binary grid with the neck split, with the seeded split and for the contour grid. pytest's own entry script
    # is guarded, so its workers may re-import it even when it is started as a plain script.
    import micronet_jax.postprocess as pp

    monkeypatch.setattr(pp, "_spawn_can_start_main", lambda: True)
    rng = np.random.default_rng(3)
    p, gt = _two_touching_discs()
    probs = [np.clip(p + rng.normal(0, 0.15, p.shape), 0, 1).astype(np.float32) for _ in range(3)]
    kw = dict(thresholds=(0.3, 0.5, 0.7), min_sizes=(0, 20), opening_radii=(0, 2), split_distances=(0, 3))
    assert tune_postprocess(probs, [gt] * 3, workers=2, **kw) == tune_postprocess(probs, [gt] * 3, **kw)
    kw = dict(thresholds=(0.3, 0.5), min_sizes=(0, 20), split_thresholds=(0.0, 0.8), min_marker_size=5)
    assert tune_postprocess(probs, [gt] * 3, workers=2, **kw) == tune_postprocess(probs, [gt] * 3, **kw)
    three = [np.stack([1 - q, q * 0.7, q * 0.3], axis=-1) for q in probs]
    kw = dict(thresholds=(0.4, 0.6), min_sizes=(0, 20), marker_thresholds=(0.2, 0.4), min_marker_size=5,
              marker_sigma=1.0)
    assert tune_postprocess(three, [gt] * 3, workers=2, **kw) == tune_postprocess(three, [gt] * 3, **kw)
    assert "worker processes failed" not in caplog.text  # The pool ran; no in-process fallback.


def test_tuning_stays_in_process_for_a_plain_script(monkeypatch) -> None:
    # Spawned workers would run a plain script's top level again; `python -m` and `-c` are safe.
    import sys
    import types

    import micronet_jax.postprocess as pp

    script = types.ModuleType("__main__")
    script.__file__, script.__spec__ = "/some/script.py", None
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert not pp._spawn_can_start_main()
    script.__spec__ = types.SimpleNamespace(name="micronet_jax.main")
    assert pp._spawn_can_start_main()
    del script.__file__
    script.__spec__ = None
    assert pp._spawn_can_start_main()
