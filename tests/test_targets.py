"""The three-class contour target, its class-balanced weights, the watershed that uses it, the
widened gaps of the two-class target, and resampling by data.scale."""

import numpy as np
import pytest

from micronet_jax.config import num_classes_for_target
from micronet_jax.data import resample, targets
from micronet_jax.data.synthetic import make_synthetic_glands
from micronet_jax.data.weight_map import class_weight_map, unet_weight_map
from micronet_jax.postprocess import contour_to_instances, probability_to_instances, tune_postprocess


def two_touching_squares():
    label = np.zeros((40, 60), np.int32)
    label[10:30, 10:30] = 1
    label[10:30, 30:50] = 2  # shares the column boundary 29|30 with gland 1
    return label


def test_boundary_band_covers_both_sides_of_a_touching_border():
    label = two_touching_squares()
    classes = targets.class_map(label, "contour", boundary_width=2)
    assert set(np.unique(classes)) == {0, 1, 2}
    # Background stays background; each gland's outer two rings are band, the rest interior.
    assert (classes[label == 0] == 0).all()
    assert (classes[10:12, 10:50] == 2).all() and (classes[28:30, 10:50] == 2).all()
    assert (classes[12:28, 28:32] == 2).all()  # both sides of the touching line
    assert (classes[12:28, 12:28] == 1).all() and (classes[12:28, 32:48] == 1).all()
    # So the interiors of the two glands are no longer connected.
    from scipy import ndimage

    assert ndimage.label(classes == 1)[1] == 2
    assert ndimage.label(label > 0)[1] == 1  # ...while the two-class mask is one object
    np.testing.assert_array_equal(targets.class_map(label, "binary"), (label > 0).astype(np.int32))


def test_unknown_target_and_bad_width_name_the_key():
    with pytest.raises(ValueError, match="data.target='edges'"):
        targets.class_map(np.zeros((4, 4), int), "edges")
    with pytest.raises(ValueError, match="data.boundary_width=0"):
        targets.class_map(np.ones((4, 4), int), "contour", boundary_width=0)
    assert num_classes_for_target("binary") == 2 and num_classes_for_target("contour") == 3


def test_three_class_balance_gives_every_class_the_same_total_weight():
    label = two_touching_squares()
    classes = targets.class_map(label, "contour", boundary_width=2)
    w = class_weight_map(label, True, classes)
    totals = [w[classes == k].sum() for k in range(3)]
    np.testing.assert_allclose(totals, [w.size / 3] * 3, rtol=1e-5)
    assert w.mean() == pytest.approx(1.0, rel=1e-6)
    # The separation term still lands on the background between glands.
    label2 = np.zeros((40, 60), np.int32)
    label2[10:30, 10:28] = 1
    label2[10:30, 31:50] = 2
    full = unet_weight_map(label2, classes=targets.class_map(label2, "contour", 2))
    balance = class_weight_map(label2, True, targets.class_map(label2, "contour", 2))
    assert (full[15, 28:31] > balance[15, 28:31] + 1).all()


def fake_contour_probabilities(label, boundary_width=3):
    """What a perfect contour model outputs: one-hot of the 3-class target."""
    classes = targets.class_map(label, "contour", boundary_width)
    return np.eye(3, dtype=np.float32)[classes]


def test_widen_gaps_opens_the_sides_that_face_a_neighbour_only():
    label = two_touching_squares()
    label[10:30, 54:58] = 3  # a 4-px gap right of gland 2: 5 px from its last column
    out = targets.widen_gaps(label, 2)
    assert (out[10:30, 28:32] == 0).all()  # both sides of the shared border give up 2 columns
    assert (out[10:30, 10:28] == 1).all() and (out[10:30, 32:50] == 2).all()
    assert (out == 3).sum() == (label == 3).sum()  # 5 px from gland 2: further than the width
    assert set(np.unique(out)) == {0, 1, 2, 3} and out.dtype == label.dtype
    assert (out[label == 0] == 0).all()  # only gland pixels change, and only to background
    np.testing.assert_array_equal(targets.widen_gaps(out, 2), out)  # nothing left within 2 px
    np.testing.assert_array_equal(targets.widen_gaps(label, 0), label)
    # Width 6 reaches across that gap: gland 2's right side and gland 3's left side give way.
    wide = targets.widen_gaps(label, 6)
    assert (wide[10:30, 48:50] == 0).all() and (wide[10:30, 54:56] == 0).all()
    assert (wide[10:30, 47] == 2).all() and (wide[10:30, 56] == 3).all()
    with pytest.raises(ValueError, match="data.gap_width=-1"):
        targets.widen_gaps(label, -1)


def test_negative_gap_width_is_refused_before_training():
    from micronet_jax.config import base_config
    from micronet_jax.core import check_config

    c = base_config()
    c.data.gap_width = -2
    with pytest.raises(ValueError, match=r"data\.gap_width=-2 must be >= 0"):
        check_config(c, 1)
    c.data.gap_width = 2
    check_config(c, 1)


def test_training_source_widens_gaps_from_the_config_key():
    from micronet_jax.config import base_config
    from micronet_jax.data.pipeline import TrainSource

    examples = make_synthetic_glands(2, height=200, width=220, seed=1, touch_prob=0.9)
    c = base_config()
    c.data.patch_size = 128  # no padding: the source's labels have the examples' shapes
    plain = TrainSource.from_config(examples, c.data)
    c.data.gap_width = 3
    source = TrainSource.from_config(examples, c.data)
    assert source.gap_width == 3 and plain.gap_width == 0
    for ex, lab, kept in zip(examples, source.labels, plain.labels):
        np.testing.assert_array_equal(kept, ex.label)
        changed = lab != ex.label
        assert changed.any() and (lab[changed] == 0).all()  # touching glands were opened
        np.testing.assert_array_equal(targets.widen_gaps(lab, 3), lab)
    # The weight maps are made from the opened labels: the new gaps carry the separation term.
    opened = source.labels[0] != examples[0].label
    assert source.weights[0][opened].mean() > plain.weights[0][opened].mean()


def test_watershed_splits_touching_glands_that_components_merge():
    label = two_touching_squares()
    prob = fake_contour_probabilities(label)
    merged = probability_to_instances(1 - prob[..., 0], min_size=0)
    assert merged.max() == 1
    split = contour_to_instances(prob, min_size=0, min_marker_size=5)
    assert split.max() == 2
    # Each predicted object is one gland, boundary band included (up to the touching line).
    for k in (1, 2):
        ids = np.unique(split[label == k])
        assert len(ids) == 1 and ids[0] > 0
        assert (split == ids[0]).sum() == (label == k).sum()


def test_watershed_on_synthetic_crowded_glands_recovers_touching_pairs():
    ex = make_synthetic_glands(2, height=260, width=390, seed=3, touch_prob=0.9)
    from scipy import ndimage

    for e in ex:
        merged_count = ndimage.label(e.label > 0, structure=np.ones((3, 3)))[1]
        n = int(e.label.max())
        assert merged_count < n  # the generator did make touching glands
        pred = contour_to_instances(fake_contour_probabilities(e.label), min_size=0, min_marker_size=5)
        assert pred.max() > merged_count
        assert abs(int(pred.max()) - n) <= max(1, n // 10)


def test_marker_sigma_joins_seeds_of_one_noisy_gland_but_still_splits_touching_ones():
    prob = np.zeros((50, 50, 3), np.float32)
    prob[..., 0] = 1
    prob[5:45, 5:45] = [0.05, 0.9, 0.05]
    prob[5:45, 25] = [0.05, 0.3, 0.65]  # a one-pixel dip of p(interior) inside a single gland
    assert contour_to_instances(prob, min_size=0, min_marker_size=5).max() == 2
    assert contour_to_instances(prob, min_size=0, min_marker_size=5, marker_sigma=3).max() == 1
    # A real boundary band between two touching glands survives the same smoothing.
    touching = fake_contour_probabilities(two_touching_squares())
    assert contour_to_instances(touching, min_size=0, min_marker_size=5, marker_sigma=2).max() == 2
    with pytest.raises(ValueError, match="marker_sigma"):
        contour_to_instances(prob, marker_sigma=-1)


def test_merge_threshold_rejoins_a_gland_cut_where_no_boundary_is_predicted():
    prob = np.zeros((50, 60, 3), np.float32)
    prob[..., 0] = 1
    prob[5:45, 5:55] = [0.05, 0.9, 0.05]
    prob[5:45, 27:33] = [0.45, 0.45, 0.1]  # p(interior) dips inside one gland; no boundary there
    cut = contour_to_instances(prob, min_size=0, min_marker_size=5)
    assert cut.max() == 2
    whole = contour_to_instances(prob, min_size=0, min_marker_size=5, merge_threshold=0.3)
    assert whole.max() == 1 and ((whole == 1) == (cut > 0)).all()  # same pixels, one object
    # Two glands with the boundary band between them stay apart; so do glands that do not touch.
    label = two_touching_squares()
    label[35:45, 40:50] = 3
    touching = fake_contour_probabilities(label)
    split = contour_to_instances(touching, min_size=0, min_marker_size=5, merge_threshold=0.3)
    assert split.max() == 3 and set(np.unique(split)) == {0, 1, 2, 3}
    # A band predicted at 0.6 is weak at a threshold of 0.7: the pair joins, the separate gland does not.
    unsure = touching.copy()
    unsure[..., 0] += 0.4 * unsure[..., 2]
    unsure[..., 2] *= 0.6
    assert contour_to_instances(unsure, min_size=0, min_marker_size=5, merge_threshold=0.3).max() == 3
    joined = contour_to_instances(unsure, min_size=0, min_marker_size=5, merge_threshold=0.7)
    assert joined.max() == 2 and joined[15, 15] == joined[15, 45] != joined[39, 45] > 0
    with pytest.raises(ValueError, match="merge_threshold"):
        contour_to_instances(prob, merge_threshold=1.5)
    # The tuner holds it fixed and reports it, so its best row reproduces the labels.
    gt = (cut > 0).astype(np.int32)
    for merge, f1 in ((0.0, 0.0), (0.3, 1.0)):
        best, rows = tune_postprocess([prob], [gt], (0.5,), (0,), min_marker_size=5, merge_threshold=merge)
        assert best["merge_threshold"] == merge and rows[0]["f1"] == f1
        np.testing.assert_array_equal(contour_to_instances(prob, **best), whole if merge else cut)


def test_orphan_mask_regions_without_a_seed_are_kept():
    prob = np.zeros((30, 30, 3), np.float32)
    prob[..., 0] = 1
    prob[5:15, 5:15] = [0, 0.2, 0.8]  # gland mask, but interior never above the seed threshold
    out = contour_to_instances(prob, min_size=0)
    assert out.max() == 1 and (out > 0).sum() == 100


def test_tuning_searches_the_seed_threshold_for_contour_maps():
    label = two_touching_squares()
    prob = fake_contour_probabilities(label)
    best, rows = tune_postprocess([prob], [label], [0.5], [0, 50], marker_thresholds=[0.5, 0.9],
                                  min_marker_size=5)
    assert {"marker_threshold", "min_marker_size"} <= set(best)
    assert len(rows) == 4 and max(r["f1"] for r in rows) == 1.0
    assert contour_to_instances(prob, **best).max() == 2


def test_rescale_keeps_ids_and_probabilities_return_to_the_original_size():
    e = make_synthetic_glands(1, height=120, width=180, seed=0)[0]
    small = resample.rescale_examples([e], 0.5)[0]
    assert small.image.shape == (60, 90, 3) and small.image.dtype == np.uint8
    assert small.label.shape == (60, 90)
    assert set(np.unique(small.label)) <= set(np.unique(e.label))
    prob = np.random.default_rng(0).dirichlet([1, 1, 1], size=(60, 90)).astype(np.float32)
    back = resample.resize_probabilities(prob, (120, 180))
    assert back.shape == (120, 180, 3)
    np.testing.assert_allclose(back.sum(-1), 1.0, rtol=1e-5)
    assert resample.rescale_examples([e], 1.0)[0] is e
    with pytest.raises(ValueError, match="data.scale"):
        resample.rescale_image(e.image, 0.0)


def test_contour_target_needs_three_classes_named_in_the_error():
    from micronet_jax.config import base_config
    from micronet_jax.core import check_config

    c = base_config()
    c.data.target = "contour"
    with pytest.raises(ValueError, match=r"model.num_classes=2 .*data.target='contour'.*num_classes=3"):
        check_config(c, 1)
    c.model.num_classes = 3
    check_config(c, 1)


def test_a_bad_input_normalisation_is_refused_before_training():
    from micronet_jax.config import base_config
    from micronet_jax.core import check_config

    c = base_config()
    c.data.normalize = "tile"
    with pytest.raises(ValueError, match=r"data.normalize='tile' is not one of \('crop', 'image'\)"):
        check_config(c, 1)
    c.data.normalize = "image"
    check_config(c, 1)


def test_sampler_emits_the_contour_classes_of_the_warped_crop():
    from micronet_jax.data.pipeline import TrainSampler, TrainSource

    examples = make_synthetic_glands(2, height=200, width=220, seed=1, touch_prob=0.9)
    source = TrainSource(examples, patch_size=128, target="contour", boundary_width=3)
    sample = TrainSampler(source, seed=0, crop_size=120, augment_config={"distortion_prob": 1.0,
                                                                         "distortion_max": 0.2})(0)
    assert sample["label"].dtype == np.int32 and set(np.unique(sample["label"])) <= {0, 1, 2}
    assert (sample["label"] == 2).any() and (sample["label"] == 1).any()
    # Class-balanced over three classes: the band pixels are the rarest, so the heaviest.
    w, lab = sample["weight"], sample["label"]
    assert np.median(w[lab == 2]) > np.median(w[lab == 1])


def test_bad_post_processing_constants_are_refused_before_training():
    # Validation would refuse them only after the last step; check_config names the key first.
    from micronet_jax.config import base_config
    from micronet_jax.core import check_config

    for key, value, message in [("marker_sigma", -1.0, r"eval.marker_sigma=-1.0 must be >= 0"),
                                ("threshold", 1.5, r"eval.threshold=1.5 must be in \[0.0, 1.0\]"),
                                ("merge_threshold", 1.5, r"eval.merge_threshold=1.5 must be in \[0.0, 1.0\]"),
                                ("min_size", -5, r"eval.min_size=-5 must be >= 0"),
                                ("border_min_size", -1, r"eval.border_min_size=-1 must be >= 0"),
                                ("split_threshold", -0.1, r"eval.split_threshold=-0.1 must be in \[0.0, 1.0\]"),
                                ("tune_workers", 0, r"eval.tune_workers=0 must be >= 1")]:
        c = base_config()
        c.eval[key] = value
        with pytest.raises(ValueError, match=message):
            check_config(c, 1)
    check_config(base_config(), 1)
    c = base_config()
    c.eval.split_distance, c.eval.split_threshold = 12.0, 0.8  # two ways to split at once
    with pytest.raises(ValueError, match=r"eval.split_distance=12.0 and eval.split_threshold=0.8"):
        check_config(c, 1)
