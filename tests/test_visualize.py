"""Overlays, label colouring and PNG writing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from micronet_jax.visualize import GT_COLOUR, PRED_COLOUR, colorize_labels, overlay_outlines, save_png


def _labels() -> np.ndarray:
    lab = np.zeros((40, 50), np.int32)
    lab[5:20, 5:20] = 1
    lab[5:20, 20:35] = 300  # touching the first object, id > 255
    return lab


def test_overlay_draws_pred_and_gt_outlines() -> None:
    img = np.full((40, 50, 3), 100, np.uint8)
    pred = _labels()
    gt = np.zeros_like(pred)
    gt[25:38, 10:40] = 1
    out = overlay_outlines(img, pred, gt)
    assert out.dtype == np.uint8 and out.shape == (40, 50, 3)
    assert (img == 100).all()  # input untouched
    is_pred = (out == PRED_COLOUR).all(-1)
    is_gt = (out == GT_COLOUR).all(-1)
    assert is_pred[5, 10] and is_pred[4, 10]  # 2 px thick: inside and outside the boundary
    assert not is_pred[10, 10]  # interior untouched
    assert is_pred[10, 19] and is_pred[10, 20]  # boundary between touching instances is drawn
    assert is_gt[25, 20] and not is_gt[30, 20]
    assert (out[0, 0] == 100).all()


def test_overlay_grayscale_and_rgba_inputs() -> None:
    pred = _labels()
    assert overlay_outlines(np.zeros((40, 50), np.uint8), pred).shape == (40, 50, 3)
    assert overlay_outlines(np.zeros((40, 50, 4), np.uint8), pred).shape == (40, 50, 3)
    with pytest.raises(ValueError, match="shape"):
        overlay_outlines(np.zeros((40, 50, 3), np.uint8), pred[:10])
    with pytest.raises(ValueError, match="uint8"):
        overlay_outlines(np.zeros((40, 50, 3), np.float32), pred)


def test_colorize_labels() -> None:
    lab = _labels()
    rgb = colorize_labels(lab)
    assert rgb.dtype == np.uint8 and rgb.shape == (40, 50, 3)
    assert (rgb[0, 0] == 0).all()
    assert not (rgb[10, 10] == rgb[10, 25]).all()  # distinct colours for 1 and 300
    assert rgb[10, 10].max() > 200  # bright
    # Same id -> same colour regardless of the other ids present.
    np.testing.assert_array_equal(colorize_labels(np.where(lab == 1, 1, 0))[10, 10], rgb[10, 10])


def test_save_png_roundtrip(tmp_path) -> None:
    rgb = colorize_labels(_labels())
    p = tmp_path / "sub" / "a.png"
    save_png(p, rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), rgb)
    lab16 = _labels().astype(np.uint16)
    save_png(tmp_path / "l.png", lab16)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "l.png")), lab16)
    save_png(tmp_path / "m.png", _labels() > 0)
    assert np.asarray(Image.open(tmp_path / "m.png")).max() == 255
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", np.zeros((4, 4), np.float32))
