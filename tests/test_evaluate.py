"""--mode=evaluate and --mode=predict end to end on CPU with a reduced-width model."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import load_config, run_main
from PIL import Image

from micronet_jax import evaluate, train
from micronet_jax.data import make_synthetic_glands
from micronet_jax.data.synthetic import write_glas_layout

TINY = ["--config", "configs/default.py:tiny"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for two steps, in-process (the trainer is importable without flags)."""
    workdir = tmp_path_factory.mktemp("trained")
    config = load_config("default", "tiny")
    config.train.max_steps = 2
    train.train_and_evaluate(config, str(workdir))
    return workdir


def test_evaluate_writes_reports_beside_the_paper(trained, tmp_path):
    out = tmp_path / "eval"
    run_main(*TINY, "--mode=evaluate", f"--checkpoint={trained}", f"--output={out}",
             "--config.eval.split=testA")
    report = json.load(open(out / "report.json"))
    assert report["split"] == "testA" and report["aggregation"] == "pooled"
    assert report["step"] == 2
    for key in ("f1", "object_dice", "object_hausdorff", "tp", "fp", "fn", "pixel_dice"):
        assert key in report["metrics"]
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 1 and {"name", "f1", "tp", "fp", "fn"} <= set(rows[0])
    table = open(out / "report.md").read()
    assert "paper, testA | 0.913" in table and "paper, testB | 0.724" in table
    assert os.listdir(out / "overlays")


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
    assert len(list(csv.DictReader(open(out / "tuning.csv")))) == 5 * 8 * 3
    refused = run_main(*TINY, "--mode=tune", f"--checkpoint={trained}",
                       "--config.eval.split=testA", check=False)
    assert refused.returncode == 2 and "validation split only" in refused.stderr
