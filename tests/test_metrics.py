"""GlaS metrics against the worked examples and edge cases of docs/glas_metrics.md (§7, §8)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from micronet_jax.metrics import ERROR_KINDS, glas_metrics, image_stats, per_image_metrics


def grid(rows: list[str]) -> np.ndarray:
    """Parses the doc's grid notation: '.' is background, digits are ids."""
    return np.array([[0 if c == "." else int(c) for c in r] for r in rows], dtype=np.int32)


# Example 1 (10x6): area weighting and the strict > 50% rule.
EX1_G = grid(["......", ".1111.", ".1111.", ".1111.", ".1111.", "......", "......", ".2222.", ".2222.", "......"])
EX1_S = grid(["......", ".1111.", ".1111.", ".1111.", ".1111.", "......", "......", ".22...", ".22...", "......"])
# Example 2 (4x10): split.
EX2_G = grid(["1111111111"] * 4)
EX2_S = grid(["1111111222"] * 4)
# Example 3 (4x14): merge and tie-breaking.
EX3_G = grid([".1111.22222222"] * 4)
EX3_S = grid(["1111111111...."] * 4)
# Example 4 (7x13): objects that overlap nothing.
EX4_G = grid(["111.......222"] * 3 + ["............."] * 4)
EX4_S = grid(["111.........."] * 3 + ["............."] * 3 + ["....222......"])


def test_example1_area_weighting_and_strict_rule() -> None:
    m = per_image_metrics(EX1_S, EX1_G)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["f1"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(41 / 45)
    assert m["hausdorff"] == pytest.approx(8 / 15)


def test_example1_variants() -> None:
    v5 = glas_metrics([EX1_S], [EX1_G], fn_rule="v5")
    assert (v5["tp"], v5["fp"], v5["fn"]) == (1, 1, 0)
    assert v5["f1"] == pytest.approx(2 / 3)
    ge = glas_metrics([EX1_S], [EX1_G], threshold_rule=">=")
    assert (ge["tp"], ge["fp"], ge["fn"]) == (2, 0, 0)
    assert ge["f1"] == pytest.approx(1.0)
    # Dice and Hausdorff do not depend on the detection rule.
    assert ge["object_dice"] == pytest.approx(41 / 45)
    assert v5["object_hausdorff"] == pytest.approx(8 / 15)


def test_ge_rule_two_exact_halves_of_one_gt() -> None:
    g = grid(["1111"] * 2)
    s = grid(["1122"] * 2)
    m = glas_metrics([s], [g], threshold_rule=">=")
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    m = glas_metrics([s], [g])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 2, 1)


def test_example2_split() -> None:
    m = per_image_metrics(EX2_S, EX2_G)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["dice"] == pytest.approx(10 / 13)
    assert m["hausdorff"] == pytest.approx(3.6)
    assert glas_metrics([EX2_S], [EX2_G], fn_rule="v5")["f1"] == pytest.approx(2 / 3)


def test_example3_merge_and_tie_to_smallest_id() -> None:
    m = per_image_metrics(EX3_S, EX3_G)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["dice"] == pytest.approx(100 / 189)
    assert m["hausdorff"] == pytest.approx(16 / 3)
    assert glas_metrics([EX3_S], [EX3_G], fn_rule="v5")["f1"] == pytest.approx(2 / 3)


def test_example4_objects_overlapping_nothing() -> None:
    m = per_image_metrics(EX4_S, EX4_G)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["f1"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(0.625)
    assert m["hausdorff"] == pytest.approx(math.sqrt(13) / 4 + 3 * math.sqrt(2) / 2)


def test_example5_pooled_vs_mean() -> None:
    pooled = glas_metrics([EX1_S, EX3_S], [EX1_G, EX3_G])
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (2, 1, 2)
    assert pooled["f1"] == pytest.approx(4 / 7)
    assert pooled["object_dice"] == pytest.approx(1861 / 2835)
    assert pooled["object_hausdorff"] == pytest.approx(56 / 15)
    assert pooled["num_images"] == 2 and pooled["num_empty_pred"] == 0
    mean = glas_metrics([EX1_S, EX3_S], [EX1_G, EX3_G], mode="mean")
    assert mean["f1"] == pytest.approx(7 / 12)
    assert mean["object_dice"] == pytest.approx(1361 / 1890)
    assert mean["object_hausdorff"] == pytest.approx(44 / 15)


def test_example6_pooled_with_empty_prediction() -> None:
    g2 = np.zeros((4, 10), np.int32)
    g2[0:3, 0:3] = 1
    s2 = np.zeros((4, 10), np.int32)
    pooled = glas_metrics([EX2_S, s2], [EX2_G, g2])
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (1, 1, 1)
    assert pooled["f1"] == pytest.approx(0.5)
    assert pooled["object_dice"] == pytest.approx(1073 / 1547)
    assert math.isinf(pooled["object_hausdorff"])
    assert pooled["num_empty_pred"] == 1
    mean = glas_metrics([EX2_S, s2], [EX2_G, g2], mode="mean")
    assert mean["f1"] == pytest.approx(1 / 3)
    assert mean["object_dice"] == pytest.approx(5 / 13)
    assert math.isinf(mean["object_hausdorff"])


def test_edge_both_empty() -> None:
    z = np.zeros((5, 7), np.int32)
    m = per_image_metrics(z, z)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 0)
    assert m["f1"] == 1.0 and m["dice"] == 1.0 and m["hausdorff"] == 0.0
    agg = glas_metrics([z], [z])
    assert agg["f1"] == 1.0 and agg["object_dice"] == 1.0 and agg["object_hausdorff"] == 0.0
    assert agg["pixel_dice"] == 1.0 and agg["pixel_iou"] == 1.0


def test_edge_pred_empty() -> None:
    z = np.zeros_like(EX3_G)
    m = per_image_metrics(z, EX3_G)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 0, 2)
    assert m["f1"] == 0.0 and m["dice"] == 0.0
    assert math.isinf(m["hausdorff"])


def test_edge_gt_empty() -> None:
    z = np.zeros_like(EX3_S)
    m = per_image_metrics(EX3_S, z)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 0)
    assert m["f1"] == 0.0 and m["dice"] == 0.0
    assert math.isinf(m["hausdorff"])
    agg = glas_metrics([EX3_S], [z])
    assert agg["num_empty_gt"] == 1 and agg["num_empty_pred"] == 0


def test_pooled_both_empty_image_contributes_nothing() -> None:
    z = np.zeros((3, 3), np.int32)
    a = glas_metrics([EX1_S], [EX1_G])
    b = glas_metrics([EX1_S, z], [EX1_G, z])
    for k in ("f1", "object_dice", "object_hausdorff", "tp", "fp", "fn", "pixel_dice"):
        assert a[k] == pytest.approx(b[k])


def test_ids_above_255_are_not_wrapped() -> None:
    # Ids 1 and 257 would collide under uint8; here they must stay two objects.
    g = EX1_G.astype(np.int64) * 0
    g[EX1_G == 1] = 1
    g[EX1_G == 2] = 257
    s = EX1_S.astype(np.int64) * 0
    s[EX1_S == 1] = 70000
    s[EX1_S == 2] = 256
    m = per_image_metrics(s, g)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["dice"] == pytest.approx(41 / 45)
    assert m["hausdorff"] == pytest.approx(8 / 15)
    # Very large ids use the sparse path and still give identical results.
    s_big = s.copy()
    s_big[s == 70000] = 2**40
    assert per_image_metrics(s_big, g) == pytest.approx(m)


def test_tie_to_smallest_id_is_by_value_not_position() -> None:
    # Same as Example 3 but with ids swapped: the left GT object now has the larger id 7,
    # so the tie goes to id 2 (the right object, 32 px) and S1 covers only 16/32: not a TP.
    g = np.where(EX3_G == 1, 7, EX3_G)
    m = per_image_metrics(EX3_S, g)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 2)
    assert m["f1"] == 0.0


def test_disconnected_gt_id_is_one_object() -> None:
    # GT id 1 has two disconnected 2x2 squares; a prediction covering only one covers 4/8 = 0.5.
    g = np.zeros((4, 10), np.int32)
    g[0:2, 0:2] = 1
    g[0:2, 6:8] = 1
    s = np.zeros_like(g)
    s[0:2, 0:2] = 5
    m = per_image_metrics(s, g)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    # Covering both halves with one id (as given) makes it a perfect match.
    m = per_image_metrics(g, g)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 0)
    assert m["dice"] == 1.0 and m["hausdorff"] == 0.0


def test_touching_gt_ids_stay_separate() -> None:
    g = grid(["11112222"] * 3)
    s = grid(["11111111"] * 3)  # a merge of two touching GT objects
    m = per_image_metrics(s, g)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)


def test_split_case() -> None:
    g = grid(["11111111"] * 2)
    s = grid(["11223344"] * 2)  # four quarters: none covers > 50%
    m = per_image_metrics(s, g)
    assert (m["tp"], m["fp"], m["fn"]) == (0, 4, 1)
    # v5: the GT object is claimed, so no FN.
    v5 = glas_metrics([s], [g], fn_rule="v5")
    assert (v5["tp"], v5["fp"], v5["fn"]) == (0, 4, 0)


def test_merge_case_dice() -> None:
    g = grid(["11.22"] * 2)
    s = grid(["11111"] * 2)
    m = per_image_metrics(s, g)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 1)
    d = 2 * 4 / (10 + 4)  # both GT objects partner S1
    assert m["dice"] == pytest.approx(0.5 * (d + d))


def kinds(s: np.ndarray, g: np.ndarray) -> tuple[int, ...]:
    m = per_image_metrics(s, g)
    assert sum(m[k] for k in ERROR_KINDS[:3]) == m["fn"] and sum(m[k] for k in ERROR_KINDS[3:]) == m["fp"]
    return tuple(m[k] for k in ERROR_KINDS)


def test_error_kinds_name_why_each_object_is_wrong() -> None:
    # (missed, merged, under-covered | FP on background, fragment, over an unmatched gland)
    assert kinds(EX1_S, EX1_G) == (0, 0, 1, 0, 0, 1)  # S2 covers exactly half of G2: not enough
    assert kinds(EX2_S, EX2_G) == (0, 0, 0, 0, 1, 0)  # S2 is a piece of the gland S1 matched
    assert kinds(EX3_S, EX3_G) == (0, 1, 0, 0, 0, 0)  # S1 is G1's TP and also covers half of G2
    assert kinds(EX4_S, EX4_G) == (1, 0, 0, 1, 0, 0)  # G2 untouched, S2 on background
    assert kinds(grid(["11223344"] * 2), grid(["11111111"] * 2)) == (0, 0, 1, 0, 0, 4)
    # A sliver over a gland (under a fifth of it) does not make the gland under-covered.
    assert kinds(grid(["1........."] * 2), grid(["1111111111"] * 2)) == (1, 0, 0, 0, 0, 1)
    assert kinds(grid(["...."]), grid([".11."])) == (1, 0, 0, 0, 0, 0)
    assert kinds(grid([".11."]), grid(["...."])) == (0, 0, 0, 1, 0, 0)


def test_error_kinds_pool_by_summation() -> None:
    pooled = glas_metrics([EX1_S, EX3_S, EX4_S], [EX1_G, EX3_G, EX4_G])
    assert tuple(pooled[k] for k in ERROR_KINDS) == (1, 1, 1, 1, 0, 1)


def test_pixel_scores_pooled() -> None:
    m = glas_metrics([EX1_S, EX3_S], [EX1_G, EX3_G])
    inter = 20 + 32
    pred, gt = 20 + 40, 24 + 48
    assert m["pixel_dice"] == pytest.approx(2 * inter / (pred + gt))
    assert m["pixel_iou"] == pytest.approx(inter / (pred + gt - inter))


def test_image_stats_sum_to_pooled() -> None:
    stats = [image_stats(s, g) for s, g in [(EX1_S, EX1_G), (EX3_S, EX3_G)]]
    s_side = sum(s["pred_dice_sum"] for s in stats) / sum(s["pred_area"] for s in stats)
    assert s_side == pytest.approx(218 / 315)
    assert stats[0]["hausdorff"] == pytest.approx(8 / 15)


def test_hausdorff_matches_brute_force_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    from scipy.spatial.distance import cdist

    def brute(s: np.ndarray, g: np.ndarray) -> float:
        # Brute-force reference for the pooled-in-one-image H_obj (small images only).
        def pts(lab: np.ndarray, i: int) -> np.ndarray:
            return np.argwhere(lab == i)

        def h(a: np.ndarray, b: np.ndarray) -> float:
            d = cdist(a, b)
            return max(d.min(1).max(), d.min(0).max())

        s_ids = [i for i in np.unique(s) if i]
        g_ids = [j for j in np.unique(g) if j]
        tot = {}
        for side, ids, other, other_ids in (("s", s_ids, g, g_ids), ("g", g_ids, s, s_ids)):
            lab = s if side == "s" else g
            num = den = 0.0
            for i in ids:
                a = pts(lab, i)
                ov = [(np.sum((lab == i) & (other == j)), j) for j in other_ids]
                best = max(ov, key=lambda t: (t[0], -t[1])) if ov else (0, None)
                if best[0] > 0:
                    hh = h(a, pts(other, best[1]))
                else:
                    hh = min(h(a, pts(other, j)) for j in other_ids)
                num += len(a) * hh
                den += len(a)
            tot[side] = num / den
        return 0.5 * (tot["s"] + tot["g"])

    def squares(n: int) -> np.ndarray:
        # Small separate-ish squares: most objects overlap nothing, exercising the min-H search.
        lab = np.zeros((20, 24), np.int64)
        for k in range(1, n + 1):
            y, x, sz = rng.integers(0, 17), rng.integers(0, 21), rng.integers(1, 4)
            lab[y:y + sz, x:x + sz] = k
        return lab

    cases = [(rng.integers(0, 5, size=(12, 15)) * (rng.random((12, 15)) < 0.3),
              rng.integers(0, 4, size=(12, 15)) * (rng.random((12, 15)) < 0.3)) for _ in range(4)]
    cases += [(squares(6), squares(5)) for _ in range(4)]
    for s, g in cases:
        if len(np.unique(s)) < 2 or len(np.unique(g)) < 2:
            continue
        assert per_image_metrics(s, g)["hausdorff"] == pytest.approx(brute(s, g))


def test_mismatched_length_raises() -> None:
    with pytest.raises(ValueError, match="2 prediction images but 1 ground-truth"):
        glas_metrics([EX1_S, EX1_S], [EX1_G])


def test_mismatched_shape_names_image() -> None:
    with pytest.raises(ValueError, match="image 1"):
        glas_metrics([EX1_S, EX1_S], [EX1_G, EX3_G])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="integer"):
        per_image_metrics(EX1_S.astype(float), EX1_G)
    with pytest.raises(ValueError, match="negative"):
        per_image_metrics(-EX1_S, EX1_G)
    with pytest.raises(ValueError, match="mode"):
        glas_metrics([EX1_S], [EX1_G], mode="avg")
    with pytest.raises(ValueError, match="fn_rule"):
        glas_metrics([EX1_S], [EX1_G], fn_rule="v6")
