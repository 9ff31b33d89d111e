"""--mode=evaluate and --mode=predict end to end on CPU with a reduced-width model."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import initialised_checkpoint, load_config, run_main
from PIL import Image

from micronet_jax import core, evaluate, metrics
from micronet_jax.data import load_split, make_synthetic_glands
from micronet_jax.data.synthetic import write_glas_layout

TINY = ["--config", "configs/default.py:tiny"]


@pytest.fixture(scope="module")
def trained(uninterrupted):
    """The session's six-step tiny run (conftest.py), trained through the command line."""
    return uninterrupted


def test_evaluate_writes_reports_beside_the_paper(trained, tmp_path):
    out = tmp_path / "eval"
    run_main(*TINY, "--mode=evaluate", f"--checkpoint={trained}", f"--output={out}",
             "--config.eval.split=testA")
    report = json.load(open(out / "report.json"))
    assert report["split"] == "testA" and report["aggregation"] == "pooled"
    assert report["step"] == 6
    m = report["metrics"]
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 1 and {"name", "f1", "tp", "fp", "fn"} <= set(rows[0])
    # The pooled counts are the per-image counts summed, and F1 is made from them.
    for key in ("tp", "fp", "fn"):
        assert m[key] == sum(int(r[key]) for r in rows)
    assert m["f1"] == pytest.approx(2 * m["tp"] / (2 * m["tp"] + m["fp"] + m["fn"]))
    table = open(out / "report.md").read()
    assert "paper, testA | 0.913" in table and "paper, testB | 0.724" in table
    assert f"TP {m['tp']}, FP {m['fp']}, FN {m['fn']}" in table
    # Each false object and each unmatched gland has one kind, in the CSV and in the pooled report.
    for key in ("fn_missed", "fn_merged", "fn_undercovered", "fp_background", "fp_fragment", "fp_unmatched"):
        assert m[key] == sum(int(r[key]) for r in rows)
    assert m["fn_missed"] + m["fn_merged"] + m["fn_undercovered"] == m["fn"]
    assert m["fp_background"] + m["fp_fragment"] + m["fp_unmatched"] == m["fp"]
    assert f"merged into a neighbour's object {m['fn_merged']}" in table
    assert os.listdir(out / "overlays")

    # The same images through --mode=predict: the metric of its written labels is the report's.
    config = load_config("default", "tiny")
    examples = load_split(config.data, "testA")
    images = tmp_path / "images"
    images.mkdir()
    for ex in examples:
        Image.fromarray(ex.image).save(images / f"{ex.name}.png")
    run_main(*TINY, "--mode=predict", f"--checkpoint={trained}", f"--input={images}",
             f"--output={tmp_path / 'pred'}")
    labels = [np.asarray(Image.open(tmp_path / "pred" / "labels" / f"{ex.name}.png")) for ex in examples]
    again = metrics.glas_metrics(labels, [ex.label for ex in examples])
    for key in ("tp", "fp", "fn"):
        assert again[key] == m[key], key
    for key in ("f1", "object_dice", "object_hausdorff"):
        assert evaluate.json_scalar(again[key]) == pytest.approx(m[key], rel=1e-9), key


def test_evaluate_on_official_bmp_layout(trained, tmp_path):
    """Test A/B will be scored from the official flat BMP folder: make one and score it."""
    folder = tmp_path / "glas"
    write_glas_layout(make_synthetic_glands(2, 280, 300, seed=5), folder, prefix="testB", ext="bmp")
    out = tmp_path / "eval"
    run_main(*TINY, "--mode=evaluate", f"--checkpoint={trained}", f"--output={out}",
             "--config.data.source=glas", f"--config.data.root={folder}", "--config.eval.split=testB")
    assert json.load(open(out / "report.json"))["metrics"]["num_images"] == 2


def test_predict_folder_of_mixed_sizes(trained, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(300, 200), (522, 775), (600, 530)]):
        ex = make_synthetic_glands(1, h, w, seed=10 + i)[0]
        Image.fromarray(ex.image).save(images / f"img_{i}.png")
    out = tmp_path / "pred"
    run_main(*TINY, "--mode=predict", f"--checkpoint={trained}", f"--input={images}",
             f"--output={out}")
    rows = list(csv.DictReader(open(out / "glands.csv")))
    assert [r["image"] for r in rows] == ["img_0.png", "img_1.png", "img_2.png"]
    for i, (h, w) in enumerate([(300, 200), (522, 775), (600, 530)]):
        labels = np.asarray(Image.open(out / "labels" / f"img_{i}.png"))
        assert labels.shape == (h, w)
        assert int(rows[i]["glands"]) == len(np.unique(labels[labels > 0]))
        overlay = np.asarray(Image.open(out / "overlays" / f"img_{i}_overlay.png"))
        assert overlay.shape == (h, w, 3)


def test_predict_without_images_is_one_clear_error(trained, tmp_path):
    proc = run_main(*TINY, "--mode=predict", f"--checkpoint={trained}", f"--input={tmp_path}",
                    check=False)
    assert proc.returncode == 2 and "no images" in proc.stderr and str(tmp_path) in proc.stderr


def test_checkpoint_of_another_model_is_a_clear_error(trained):
    config = load_config("default", "tiny")
    config.model.width = 1 / 32
    with pytest.raises(ValueError, match=r"model.width: checkpoint 0.015625 vs config 0.03125"):
        evaluate.load_for_inference(config, str(trained))


def test_missing_checkpoint_names_the_path(tmp_path):
    config = load_config("default", "tiny")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        evaluate.load_for_inference(config, str(tmp_path))


def test_tune_on_validation_and_refuse_test_splits(trained, tmp_path):
    out = tmp_path / "tune"
    proc = run_main(*TINY, "--mode=tune", f"--checkpoint={trained}", f"--output={out}")
    best = json.load(open(out / "best.json"))
    assert best["split"] == "val" and {"threshold", "min_size", "opening_radius"} <= set(best["params"])
    assert "--config.eval.threshold=" in proc.stdout
    grid = (len(evaluate.TUNE_THRESHOLDS) * len(evaluate.TUNE_MIN_SIZES) * len(evaluate.TUNE_OPENING_RADII)
            * len(evaluate.TUNE_SPLIT_DISTANCES) * len(evaluate.TUNE_BORDER_MIN_SIZES))
    assert grid == 5 * 10 * 3 * 3 * 3
    assert len(list(csv.DictReader(open(out / "tuning.csv")))) == grid
    refused = run_main(*TINY, "--mode=tune", f"--checkpoint={trained}",
                       "--config.eval.split=testA", check=False)
    assert refused.returncode == 2 and "validation split only" in refused.stderr


def test_tune_searches_the_seeded_split_when_the_config_uses_it(trained, tmp_path):
    """With eval.split_threshold > 0 the tuner's third axis is its seed threshold (the config's own
    value among them, 0 = connected components), not the neck split."""
    config = load_config("default", "tiny")
    config.eval.split_threshold, config.eval.min_marker_size, config.eval.max_images = 0.75, 40, 1
    rows = evaluate.tune_checkpoint(config, str(trained), str(tmp_path / "tune"))["rows"]
    assert {r["split_threshold"] for r in rows} == {*evaluate.TUNE_SPLIT_THRESHOLDS, 0.75}
    assert {r["split_distance"] for r in rows} == {0.0} and {r["min_marker_size"] for r in rows} == {40}
    best = json.load(open(tmp_path / "tune" / "best.json"))["params"]
    assert best["split_threshold"] in evaluate.TUNE_SPLIT_THRESHOLDS + (0.75,)


def test_summary_mode_end_to_end():
    """--mode=summary prints the layer table and the parameter count of the real model, with no
    weights allocated and no traceback."""
    import jax

    from micronet_jax.models import build_model
    from micronet_jax.models.summary import abstract_variables

    proc = run_main(*TINY, "--mode=summary")
    assert "Traceback" not in proc.stderr
    config = load_config("default", "tiny")
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract_variables(build_model(config.model))))
    assert f"total parameters: {count:,}\n" in proc.stdout
    for layer in ("B1", "B5", "B10", "main_head/conv"):
        assert layer in proc.stdout
    wide = run_main(*TINY, "--mode=summary", "--config.model.width=0.03125")
    wide_count = int(wide.stdout.split("total parameters: ")[1].split("\n")[0].replace(",", ""))
    assert wide_count > 3 * count  # Double width: about four times the weights.


def test_tta_with_the_real_model_is_the_mean_over_the_eight_transforms(trained):
    """On an image that fits one tile, eval.tta must equal the average of the model's probabilities
    over the 8 flips/rotations of the tile, each mapped back, and differ from the plain prediction
    (the trained model is not equivariant, so TTA has an effect to check)."""
    import jax

    from micronet_jax import infer
    from micronet_jax import inputs

    config = load_config("default", "tiny")
    model, variables, _ = evaluate.load_for_inference(config, str(trained))
    forward = core.make_forward_fn(model, variables)
    margin = int(config.eval.margin)
    image = make_synthetic_glands(1, 508 - 2 * margin, 508 - 2 * margin, seed=3)[0].image
    config.eval.tta = True
    with_tta = evaluate.predict_probabilities(forward, image, config.eval, model.variant)
    config.eval.tta = False
    plain = evaluate.predict_probabilities(forward, image, config.eval, model.variant)

    # Each tile is standardised on its own (as training standardises each crop).
    tile = inputs.standardize(
        np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    )[None].astype(np.float32)
    by_hand = np.mean([
        infer.dihedral_inverse(np.asarray(jax.nn.softmax(forward(infer.dihedral(tile, k)), -1)), k)[0]
        for k in range(8)
    ], axis=0)[margin:-margin, margin:-margin]
    np.testing.assert_allclose(with_tta, by_hand, atol=1e-5)
    assert np.abs(with_tta - plain).max() > 1e-3


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A second checkpoint of the tiny model (its initial weights), for ensembles with ``trained``."""
    return initialised_checkpoint(tmp_path_factory.mktemp("untrained"), seed=7)


def test_ensemble_of_checkpoints_averages_their_probabilities(trained, untrained, tmp_path):
    """Several --checkpoint: the tile forward's softmax is the members' mean probability, and
    --mode=evaluate scores it, naming every member; without --output it stops with one message."""
    import jax

    from micronet_jax.ensemble import Ensemble

    config = load_config("default", "tiny")
    model, stacked, steps = evaluate.load_for_inference(config, [str(trained), str(untrained)])
    assert isinstance(model, Ensemble) and model.size == 2 and steps == [6, 0]
    tile = np.random.default_rng(0).normal(size=(2, 508, 508, 3)).astype(np.float32)
    members = [evaluate.load_for_inference(config, str(p))[:2] for p in (trained, untrained)]
    probs = [np.asarray(jax.nn.softmax(core.make_forward_fn(m, v)(tile), -1)) for m, v in members]
    mean = np.asarray(jax.nn.softmax(core.make_forward_fn(model, stacked)(tile), -1))
    np.testing.assert_allclose(mean, (probs[0] + probs[1]) / 2, atol=1e-6)
    assert np.abs(probs[0] - probs[1]).max() > 1e-2  # Two different members: the mean is not either.

    out = tmp_path / "ensemble"
    run_main(*TINY, "--mode=evaluate", f"--checkpoint={trained}", f"--checkpoint={untrained}",
             f"--output={out}", "--config.eval.split=testA")
    report = json.load(open(out / "report.json"))
    assert report["step"] == [6, 0]
    assert report["checkpoint"] == [os.path.abspath(trained), os.path.abspath(untrained)]
    refused = run_main(*TINY, "--mode=evaluate", f"--checkpoint={trained}", f"--checkpoint={untrained}",
                       check=False)
    assert refused.returncode != 0 and "--output is required with several --checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr
