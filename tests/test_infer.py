"""Tiled inference: exactness against whole-image forward passes, seams, TTA, odd sizes, batching."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.infer import blend_window, dihedral, dihedral_inverse, tile_positions, tiled_predict

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(3, 2)).astype(np.float32)
B1 = np.array([0.1, -0.2], np.float32)
K3 = RNG.normal(size=(3, 3, 3, 2)).astype(np.float32)  # asymmetric 3x3 conv kernel


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def linear_fn(x: np.ndarray) -> np.ndarray:
    """Per-pixel 1x1 linear map: equivariant to every spatial transform."""
    return x @ W1 + B1


def pointwise_fn(x: np.ndarray) -> np.ndarray:
    """A nonlinear per-pixel function (no knowledge of position inside a tile)."""
    return np.stack([np.sin(3 * x[..., 0]) + x[..., 1] * x[..., 2], np.cos(2 * x[..., 1])], -1)


def conv_fn(x: np.ndarray) -> np.ndarray:
    """3x3 'same' conv with zero padding (receptive radius 1), batched (n, h, w, 3) -> (n, h, w, 2)."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (2,), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += xp[:, dy:dy + h, dx:dx + w] @ K3[dy, dx]
    return out


def smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([np.sin(yy / 17), np.cos(xx / 23), np.sin((yy + xx) / 31)], -1).astype(np.float32)


def conv_reference(img: np.ndarray, margin: int) -> np.ndarray:
    padded = np.pad(img, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    out = softmax(conv_fn(padded[None]))[0]
    return out[margin:margin + img.shape[0], margin:margin + img.shape[1]]


def test_tile_positions_spec_example() -> None:
    assert tile_positions(903, 508, 64) == [0, 380, 395]  # 775 + 2*64
    assert tile_positions(650, 508, 64) == [0, 142]  # 522 + 2*64: 3 x 2 = 6 tiles
    assert tile_positions(508, 508, 64) == [0]
    assert tile_positions(64 + 48, 64, 8) == [0, 48]
    with pytest.raises(ValueError):
        tile_positions(600, 128, 64)


def test_exactly_one_tile_equals_single_forward_pass() -> None:
    img = RNG.normal(size=(380, 380, 3)).astype(np.float32)  # 380 + 2*64 = 508: one tile
    calls = []

    def fwd(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return conv_fn(x)

    got = tiled_predict(fwd, img, tile=508, margin=64, tile_batch=1)
    assert calls == [(1, 508, 508, 3)]
    padded = np.pad(img, ((64, 64), (64, 64), (0, 0)), mode="reflect")
    want = softmax(conv_fn(padded[None]))[0, 64:444, 64:444]
    assert got.dtype == np.float32 and got.shape == (380, 380, 2)
    chex.assert_trees_all_close(got, want, atol=1e-6)


@pytest.mark.parametrize("stitch", ["center", "blend"])
def test_seamless_pointwise(stitch: str) -> None:
    img = smooth_image(150, 170)
    got = tiled_predict(pointwise_fn, img, tile=64, margin=8, stitch=stitch, tile_batch=3)
    want = softmax(pointwise_fn(img))
    chex.assert_trees_all_close(got, want, atol=1e-6)
    # No discontinuity: neighbouring-column differences stay as small as the smooth input allows.
    jump = np.abs(np.diff(got, axis=1)).max()
    assert jump <= np.abs(np.diff(want, axis=1)).max() + 1e-6


@pytest.mark.parametrize("shape", [(522, 775), (775, 522), (300, 200), (20, 7)])
def test_center_stitch_equals_whole_image_conv(shape: tuple[int, int]) -> None:
    """With margin >= receptive radius, centre stitching is exact for a local conv, at any size."""
    img = RNG.normal(size=shape + (3,)).astype(np.float32)
    got = tiled_predict(conv_fn, img, tile=128, margin=16, stitch="center", tile_batch=4)
    assert got.shape == shape + (2,)
    chex.assert_trees_all_close(got, conv_reference(img, 16), atol=1e-5)


def test_smaller_than_tile_default_geometry() -> None:
    img = RNG.normal(size=(300, 200, 3)).astype(np.float32)
    got = tiled_predict(conv_fn, img, tile=508, margin=64, tile_batch=1)
    chex.assert_trees_all_close(got, conv_reference(img, 64), atol=1e-5)


def test_blend_of_exact_tiles_is_exact() -> None:
    """A per-pixel function is exact on every tile, so any weighted average of tiles must be too."""
    img = smooth_image(100, 90)
    got = tiled_predict(pointwise_fn, img, tile=48, margin=8, stitch="blend", tile_batch=4)
    chex.assert_trees_all_close(got, softmax(pointwise_fn(img[None]))[0], atol=1e-6)


def test_blend_weights_each_tile_by_the_window() -> None:
    """Tiles that disagree (each predicts its own constant) are averaged with the 2-D raised-cosine
    window, normalised per pixel: the result equals that average computed by hand."""
    from micronet_jax.infer import _pad_amounts

    h, w, tile, margin = 100, 90, 48, 8
    img = smooth_image(h, w)

    def per_tile_constant(batch: np.ndarray) -> np.ndarray:
        c = batch.mean(axis=(1, 2, 3))  # One value per tile (its mean input).
        return np.stack([np.broadcast_to(c[:, None, None], batch.shape[:3]),
                         np.zeros(batch.shape[:3])], -1).astype(np.float32)

    got = tiled_predict(per_tile_constant, img, tile=tile, margin=margin, stitch="blend", tile_batch=3)
    (top, bottom), (left, right) = _pad_amounts(h, tile, margin), _pad_amounts(w, tile, margin)
    padded = np.pad(img, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    win1 = blend_window(tile, margin).astype(np.float64)
    num = np.zeros(padded.shape[:2] + (2,))
    den = np.zeros(padded.shape[:2] + (1,))
    for y in tile_positions(padded.shape[0], tile, margin):
        for x in tile_positions(padded.shape[1], tile, margin):
            c = padded[y:y + tile, x:x + tile].mean()
            p = softmax(np.array([c, 0.0]))
            wt = (win1[:, None] * win1[None, :])[..., None]
            num[y:y + tile, x:x + tile] += wt * p
            den[y:y + tile, x:x + tile] += wt
    want = (num / den)[top:top + h, left:left + w]
    assert np.ptp(want[..., 0]) > 1e-3  # The tiles really disagree, so the weights matter.
    chex.assert_trees_all_close(got, want.astype(np.float32), atol=1e-5)


def test_blend_window_positive_and_symmetric() -> None:
    w = blend_window(64, 8)
    assert (w > 0).all() and np.allclose(w, w[::-1]) and w.max() == 1.0
    assert (blend_window(16, 0) > 0).all()


def test_always_calls_with_full_batches() -> None:
    shapes = []

    def fwd(x: np.ndarray) -> np.ndarray:
        shapes.append(x.shape)
        return linear_fn(x)

    img = smooth_image(100, 60)  # padded 116 x 76, stride 32 -> 4 x 2 = 8 tiles
    tiled_predict(fwd, img, tile=48, margin=8, tile_batch=3)
    assert shapes == [(3, 48, 48, 3)] * 3  # last batch padded with zeros
    shapes.clear()
    tiled_predict(fwd, img, tile=48, margin=8, tile_batch=3, tta=True)  # 64 tile-transforms
    assert shapes == [(3, 48, 48, 3)] * 22


def test_dihedral_inverse_roundtrip() -> None:
    x = RNG.normal(size=(2, 5, 5, 3))
    seen = set()
    for k in range(8):
        y = dihedral(x, k)
        np.testing.assert_array_equal(dihedral_inverse(y, k), x)
        seen.add(y.tobytes())
    assert len(seen) == 8  # all eight transforms are distinct


def test_tta_equivariant_fn_equals_no_tta() -> None:
    img = smooth_image(70, 90)
    a = tiled_predict(linear_fn, img, tile=48, margin=8, tta=False)
    b = tiled_predict(linear_fn, img, tile=48, margin=8, tta=True, tile_batch=3)  # splits a tile's 8
    chex.assert_trees_all_close(a, b, atol=1e-6)


def test_tta_averages_inverted_outputs() -> None:
    """A non-equivariant conv on a one-tile image: TTA equals the manual 8-way average."""
    img = RNG.normal(size=(32, 32, 3)).astype(np.float32)  # 32 + 2*8 = 48: one tile
    got = tiled_predict(conv_fn, img, tile=48, margin=8, tta=True, tile_batch=8)
    padded = np.pad(img, ((8, 8), (8, 8), (0, 0)), mode="reflect")[None]
    want = np.mean([dihedral_inverse(softmax(conv_fn(dihedral(padded, k))), k) for k in range(8)], 0)
    chex.assert_trees_all_close(got, want[0, 8:40, 8:40], atol=1e-6)
    no_tta = tiled_predict(conv_fn, img, tile=48, margin=8, tta=False)
    assert np.abs(got - no_tta).max() > 1e-3  # the conv is not equivariant, so TTA changes it


def test_jitted_jax_forward_compiles_once() -> None:
    traces = []

    @jax.jit
    def fwd(x: jnp.ndarray) -> jnp.ndarray:
        traces.append(x.shape)
        return jnp.einsum("nhwc,ck->nhwk", x, W1) + B1

    for shape in [(50, 70), (90, 40), (10, 10)]:
        img = smooth_image(*shape)
        got = tiled_predict(fwd, img, tile=48, margin=8, tile_batch=2)
        chex.assert_trees_all_close(got, softmax(linear_fn(img)), atol=1e-5)
    assert len(traces) == 1


def test_errors() -> None:
    img = smooth_image(20, 20)
    with pytest.raises(ValueError, match="stitch"):
        tiled_predict(linear_fn, img, tile=32, margin=4, stitch="mean")
    with pytest.raises(ValueError, match="margin"):
        tiled_predict(linear_fn, img, tile=32, margin=16)
    with pytest.raises(ValueError, match="logits"):
        tiled_predict(lambda x: x[:, :-1], img, tile=32, margin=4)


@pytest.mark.parametrize("shape", [(150, 170), (49, 200), (5, 5)])
def test_center_never_uses_tile_margins(shape: tuple[int, int]) -> None:
    """A forward_fn that poisons each tile's outer margin band: centre stitching must never show it."""
    tile, margin = 40, 6
    band = np.ones((tile, tile), bool)
    band[margin:-margin, margin:-margin] = False

    def poisoned(x: np.ndarray) -> np.ndarray:
        logits = np.zeros(x.shape[:3] + (2,), np.float32)
        logits[:, band, 1] = 10.0
        logits[:, ~band, 0] = 10.0
        return logits

    got = tiled_predict(poisoned, smooth_image(*shape), tile=tile, margin=margin, stitch="center")
    assert got[..., 1].max() < 0.5


def test_each_tile_is_standardised_like_a_training_crop():
    """Training standardises each crop; inference must standardise each tile, not the whole image."""
    from micronet_jax import evaluate, infer
    from micronet_jax.config import base_config
    from micronet_jax.inputs import standardize
    from micronet_jax.data.synthetic import make_synthetic_glands

    image = make_synthetic_glands(1, height=522, width=775, seed=4)[0].image
    seen = []

    def forward(tiles):
        seen.extend(np.array(t) for t in tiles)
        return np.zeros(tiles.shape[:3] + (2,), np.float32)

    cfg = base_config().eval
    cfg.tile_batch = 1
    evaluate.predict_probabilities(forward, image, cfg, 508)
    (top, bottom), (left, right) = (infer._pad_amounts(n, 508, 64) for n in image.shape[:2])
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    ys = infer.tile_positions(padded.shape[0], 508, 64)
    xs = infer.tile_positions(padded.shape[1], 508, 64)
    want = [standardize(padded[y:y + 508, x:x + 508]) for y in ys for x in xs]
    assert len(seen) == len(want) == 6
    for got, w in zip(seen, want):
        np.testing.assert_allclose(got, w, atol=1e-5)
        assert abs(float(got.mean())) < 1e-4 and abs(float(got.std()) - 1) < 1e-3
    # The whole-image standardisation it replaces differs visibly on the same pixels.
    whole = standardize(padded)[ys[0]:ys[0] + 508, xs[0]:xs[0] + 508]
    assert np.abs(whole - want[0]).max() > 0.01


def test_image_normalisation_gives_each_pixel_one_value_in_every_tile():
    """data.normalize="image": every tile is standardised with the resampled image's statistics, so
    a pixel two tiles share reaches the network with the same value from both (under "crop" it does
    not), and the values are the whole image's standardisation."""
    from micronet_jax import evaluate, infer
    from micronet_jax.config import base_config
    from micronet_jax.inputs import moments, standardize_with
    from micronet_jax.data.synthetic import make_synthetic_glands

    image = make_synthetic_glands(1, height=522, width=775, seed=4)[0].image
    cfg = base_config().eval
    cfg.tile_batch = 1
    (top, bottom), (left, right) = (infer._pad_amounts(n, 508, 64) for n in image.shape[:2])
    padded = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="reflect")
    ys = infer.tile_positions(padded.shape[0], 508, 64)
    xs = infer.tile_positions(padded.shape[1], 508, 64)
    overlap = {}
    for normalize in ("image", "crop"):
        seen = []

        def forward(tiles):
            seen.extend(np.array(t) for t in tiles)
            return np.zeros(tiles.shape[:3] + (2,), np.float32)

        evaluate.predict_probabilities(forward, image, cfg, 508, normalize=normalize)
        assert len(seen) == len(ys) * len(xs) == 6
        # Tiles 0 and 1 share columns xs[1]..xs[0]+508 of the first row of tiles.
        overlap[normalize] = np.abs(seen[0][:, xs[1]:] - seen[1][:, : 508 - xs[1]]).max()
        if normalize == "image":
            whole = standardize_with(padded, *moments(image))
            for (y, x), got in zip([(y, x) for y in ys for x in xs], seen):
                np.testing.assert_allclose(got, whole[y:y + 508, x:x + 508], atol=1e-5)
    assert overlap["image"] < 1e-6 < 0.01 < overlap["crop"]

    with pytest.raises(ValueError, match="data.normalize='tile'"):
        evaluate.predict_probabilities(lambda t: t, image, cfg, 508, normalize="tile")
