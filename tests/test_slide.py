"""Whole-slide prediction: reading, stitching across regions, QuPath export, bad input.

The streamed result is checked against predicting the same pixels in memory as one image. Most tests
use a fake forward (numpy, cheap) so that an 8,192 px slide stays fast; it adds a term that depends on
the position inside the tile, so a tile grid that drifted between the two paths would show. One test
goes through the real command line with a reduced-width model.
"""

import csv
import json

import numpy as np
import pytest
import shapely
import tifffile
from conftest import initialised_checkpoint, load_config, run_main
from scipy import ndimage
from shapely.geometry import shape

from micronet_jax import infer, postprocess, slide, wsi
from micronet_jax.data.readers import DataError
from micronet_jax.data.synthetic_slide import SyntheticSlide
from micronet_jax.stitch import GlandStitcher


def _stitch_all(prob, region, **kw):
    h, w = prob.shape
    st = GlandStitcher(h, w, **kw)
    glands = []
    for y in range(0, h, region[0]):
        for x in range(0, w, region[1]):
            glands += st.add_region(y, x, prob[y:y + region[0], x:x + region[1]])
    merged, absorbed = st.finish()
    return [g for g in glands if g.id not in absorbed] + merged


@pytest.mark.parametrize("region", [(1100, 1300), (300, 250), (97, 131)])
def test_stitcher_equals_whole_image_postprocessing(region):
    """Glands cut by regions (even tiny ones) come out whole and once, with the in-memory pixel counts,
    including holes that close only across a border and glands that lie in such holes."""
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(rng.standard_normal((1100, 1300)), 6)
    p = (1 / (1 + np.exp(-40 * p))).astype(np.float32)
    ref = postprocess.probability_to_instances(p, 0.5, True, 0, 30)
    glands = _stitch_all(p, region, threshold=0.5, fill_holes=True, min_size=30)
    assert len(glands) == ref.max() > 100
    assert sorted(g.area_px for g in glands) == sorted(np.bincount(ref.ravel())[1:].tolist())
    assert len({g.id for g in glands}) == len(glands)
    for g in glands:
        assert g.polygon.geom_type == "Polygon" and g.polygon.is_valid and not g.polygon.interiors
        assert abs(g.polygon.area - g.area_px) < 1e-3
    # Mean probabilities: those of the reference's pixels, for glands whose holes all closed in-region.
    ref_mean = ndimage.mean(p, ref, np.arange(ref.max() + 1))
    close = 0
    for g in glands:
        pt = g.polygon.representative_point()
        close += abs(g.mean_probability - ref_mean[ref[int(pt.y), int(pt.x)]]) < 1e-4
    # Holes that close only across a border do not add their probabilities (stitch.py): with tiny
    # regions that is a few glands.
    assert close >= (0.9 if region[0] < 1100 else 1.0) * len(glands)


def test_stitcher_keeps_holes_when_not_filling():
    p = np.zeros((200, 200), np.float32)
    p[20:120, 30:150] = 1
    p[50:80, 60:110] = 0  # a hole, cut by the region border at x=100
    glands = _stitch_all(p, (200, 100), threshold=0.5, fill_holes=False, min_size=10)
    assert len(glands) == 1 and len(glands[0].polygon.interiors) == 1
    assert glands[0].area_px == 100 * 120 - 30 * 50
    filled = _stitch_all(p, (200, 100), threshold=0.5, fill_holes=True, min_size=10)
    assert filled[0].area_px == 100 * 120 and not filled[0].polygon.interiors


def test_axis_plan_matches_tiled_predict():
    """The slide grid is the one tiled_predict uses, for small and large lengths."""
    for length in (100, 508, 903, 5000):
        plan = wsi.axis_plan(length, 508, 64)
        covered = np.zeros(length, int)
        for i in range(len(plan.positions)):
            lo, hi = plan.kept(i, length)
            covered[lo:hi] += 1
        assert (covered == 1).all()


def _fake_forward(mean, std):
    """Gland logit from brightness (the synthetic lumina are pale), minus glass, plus a ramp over the
    tile: the ramp makes the output depend on where a pixel sits in its tile."""
    def forward(tiles):
        rgb = tiles * (std * 255) + mean * 255
        b = rgb.mean(-1)
        glass = (rgb.min(-1) > 236) & (np.ptp(rgb, axis=-1) < 8)
        ramp = np.linspace(-0.4, 0.4, tiles.shape[1], dtype=np.float32)
        gland = (b - 205) / 8 + ramp[None, :, None] + ramp[None, None, :] - 50 * glass
        return np.stack([np.zeros_like(gland), gland], -1)
    return forward


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    """8,192 x 8,192 px, 0.62 um/px, pyramidal, glass with three tissue areas (one crosses regions)."""
    path = tmp_path_factory.mktemp("slide") / "big.tif"
    synth = SyntheticSlide(8192, 8192, seed=3, tissue=[(300, 400, 2400, 3100), (4000, 5000, 5200, 7900),
                                                       (6600, 700, 7900, 2300)])
    synth.write(path, mpp=0.62)
    return path, synth


def test_big_slide_streams_to_the_in_memory_result(big_slide, tmp_path):
    path, synth = big_slide
    config = load_config("default", "tiny")
    config.eval.tile_batch = 4
    config.eval.min_size = 150
    config.eval.region_size = 1520  # 4 tiles: several regions cut each tissue area
    config.eval.write_probability_tiff = True
    sl = slide.open_slide(path)
    assert sl.mpp == pytest.approx(0.62) and len(sl.level_dimensions) >= 4
    grid = slide.plan_grid(sl, 0.62)
    thumb, k = slide.thumbnail(sl, int(config.eval.thumbnail_size))
    mean, std = slide.normalization_stats(sl, grid, slide.tissue_mask(thumb), k, seed=config.seed)
    sl.close()
    forward = _fake_forward(mean, std)
    out = tmp_path / "out"
    summary = wsi.predict_slide(config, forward, path, out, tile=508, progress=False)
    assert summary["normalization"] == {"mean": mean, "std": std}
    n_all = len(wsi.axis_plan(8192, 508, 64).positions) ** 2
    assert summary["tiles_run"] < 0.5 * n_all  # glass was skipped

    image = synth.region(0, 0, 8192, 8192)
    x = (image.astype(np.float32) / 255 - mean) / std
    del image
    prob = infer.tiled_predict(forward, x, tile=508, margin=64, tile_batch=4)[..., 1]
    del x
    ref = postprocess.probability_to_instances(prob, 0.5, True, 0, 150)
    areas = np.bincount(ref.ravel())[1:]

    gj = json.load(open(out / "glands.geojson"))
    assert gj["type"] == "FeatureCollection"
    feats = gj["features"]
    rows = list(csv.DictReader(open(out / "glands.csv")))
    assert len(feats) == len(rows) == summary["glands"] == ref.max() > 200
    assert sum(int(r["area_px"]) for r in rows) == areas.sum()
    for f in feats:
        assert f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] == "Gland"
        assert shape(f["geometry"]).is_valid
    # Right place: one pixel of every reference gland is inside exactly one polygon, and that gland's
    # CSV area and centroid are the reference's.
    polys = [shape(f["geometry"]) for f in feats]
    tree = shapely.STRtree(polys)
    com = ndimage.center_of_mass(np.ones_like(ref), ref, np.arange(1, ref.max() + 1))
    first = ndimage.find_objects(ref)
    by_id = {int(r["id"]): r for r in rows}
    ids = [int(f["properties"]["name"].split()[1]) for f in feats]
    matched = 0
    for lab, ((cy, cx), area, sl) in enumerate(zip(com, areas, first), start=1):
        ys, xs = np.nonzero(ref[sl] == lab)
        y, x = ys[len(ys) // 2] + sl[0].start, xs[len(ys) // 2] + sl[1].start
        hits = tree.query(shapely.Point(x + 0.5, y + 0.5), predicate="intersects")
        assert len(hits) == 1
        row = by_id[ids[hits[0]]]
        if int(row["area_px"]) == area:
            matched += 1
            assert abs(float(row["centroid_x_px"]) - (cx + 0.5)) < 0.05
            assert abs(float(row["centroid_y_px"]) - (cy + 0.5)) < 0.05
    assert matched >= 0.98 * len(areas)  # (simplified outlines can miss a pixel at a thin neck)
    # The probability map: pyramidal OME-TIFF of the same probabilities (0 on skipped glass).
    with tifffile.TiffFile(out / "probability.ome.tif") as tif:
        assert tif.is_ome and len(tif.series[0].levels) >= 5
        level0 = tif.series[0].levels[0].asarray()
    assert level0.shape == (8192, 8192)
    assert np.abs(level0.astype(np.int16) - np.rint(prob * 255).astype(np.int16)).max() <= 1
    overlay = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "overlay.png"))
    assert overlay.shape[2] == 3 and max(overlay.shape[:2]) == 2048
    assert (overlay == (0, 200, 0)).all(-1).sum() > 1000  # outlines drawn


def test_resolution_is_chosen_from_the_pyramid(tmp_path):
    path = tmp_path / "s.tif"
    synth = SyntheticSlide(2400, 2000, seed=1)
    synth.write(path, mpp=0.31)
    sl = slide.open_slide(path)
    g = slide.plan_grid(sl, 0.62)  # level 1 is exactly 0.62 um/px: read it, no resampling
    assert (g.level, g.k, g.resample, g.width, g.height) == (1, 2.0, False, 1000, 1200)
    g = slide.plan_grid(sl, 0.5)  # between levels: read level 0, resample by 0.31/0.5
    assert g.level == 0 and g.resample and g.width == round(2000 * 0.31 / 0.5)
    region = slide.read_model_region(sl, g, 100, 200, 300, 250)
    ref = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(synth.region(0, 0, 2400, 2000))
                     .resize((g.width, g.height), 1))[200:450, 100:400]  # 1 = LANCZOS
    assert region.shape == (250, 300, 3)
    assert np.abs(region.astype(int) - ref.astype(int)).mean() < 12
    assert slide.plan_grid(sl, None).level == 0
    with pytest.raises(DataError, match=r"eval.slide_level=5: slide .*s.tif has 2 level"):
        slide.plan_grid(sl, 0.62, level=5)
    sl.close()


def test_bad_slides_are_one_clear_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide" * 100)
    with pytest.raises(DataError, match=r"unreadable or unsupported slide .*broken.svs"):
        slide.open_slide(bad)
    with pytest.raises(DataError, match="slide not found"):
        slide.open_slide(tmp_path / "missing.svs")
    nompp = tmp_path / "nompp.tif"
    SyntheticSlide(1100, 1100, seed=2).write(nompp, mpp=None)
    sl = slide.open_slide(nompp)
    assert sl.mpp is None
    with pytest.raises(DataError, match=r"nompp.tif has no resolution .*eval.slide_mpp"):
        slide.plan_grid(sl, 0.62)
    assert slide.plan_grid(sl, 0.62, slide_mpp=0.62).k == 1.0
    sl.close()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DataError, match=r"--output must be a folder, but .*afile is a file"):
        wsi.check_output_dir(afile)
    # The neck-splitting watershed is per image; slides are labelled by stitched components only.
    config = load_config("default", "tiny")
    config.eval.split_distance = 12.0
    with pytest.raises(DataError, match=r"eval.split_distance=12.0: .*--config.eval.split_distance=0"):
        wsi.predict_slide(config, lambda x: x, nompp, tmp_path / "o", tile=508, progress=False)
    config.eval.split_distance, config.eval.split_threshold = 0.0, 0.8
    with pytest.raises(DataError, match=r"eval.split_threshold=0.8: .*--config.eval.split_threshold=0"):
        wsi.predict_slide(config, lambda x: x, nompp, tmp_path / "o", tile=508, progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny model saved as a step-0 checkpoint (the CLI restores from one);
    no training step is compiled, which keeps the test cheap."""
    return initialised_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_cli_predicts_a_slide_with_a_real_model(checkpoint, tmp_path):
    """End to end: --mode=predict on a pyramidal TIFF; the probabilities equal the in-memory ones."""
    path = tmp_path / "cli.tif"
    synth = SyntheticSlide(1400, 1700, seed=4, tissue=[(100, 100, 1300, 1500)])
    synth.write(path, mpp=0.62)
    out = tmp_path / "pred"
    proc = run_main("--config", "configs/default.py:tiny", "--mode=predict", f"--checkpoint={checkpoint}",
                    f"--input={path}", f"--output={out}", "--config.eval.region_size=760",
                    "--config.eval.write_probability_tiff=True", "--config.eval.tissue_mask=False",
                    "--config.eval.min_size=0", "--config.eval.threshold=0.0")
    assert "Traceback" not in proc.stderr
    res = out / "cli"
    summary = json.load(open(res / "summary.json"))
    assert summary["regions"] == 6 and summary["model_grid"]["width"] == 1700
    gj = json.load(open(res / "glands.geojson"))
    assert all(shape(f["geometry"]).is_valid for f in gj["features"])
    assert len(gj["features"]) == summary["glands"] == len(list(csv.DictReader(open(res / "glands.csv"))))

    from micronet_jax import core, evaluate

    config = load_config("default", "tiny")
    model, variables, _ = evaluate.load_for_inference(config, str(checkpoint))
    forward = core.make_forward_fn(model, variables)
    m, s = summary["normalization"]["mean"], summary["normalization"]["std"]
    x = (synth.region(0, 0, 1400, 1700).astype(np.float32) / 255 - m) / s
    prob = infer.tiled_predict(forward, x, tile=508, margin=64, tile_batch=int(config.eval.tile_batch))[..., 1]
    level0 = tifffile.imread(res / "probability.ome.tif", level=0)
    assert np.abs(level0.astype(np.int16) - np.rint(prob * 255).astype(np.int16)).max() <= 1


def test_cli_bad_inputs_are_one_line(checkpoint, tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"garbage" * 50)
    proc = run_main("--config", "configs/default.py:tiny", "--mode=predict", f"--checkpoint={checkpoint}",
                    f"--input={bad}", f"--output={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unreadable or unsupported slide" in proc.stderr and str(bad) in proc.stderr
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = run_main("--config", "configs/default.py:tiny", "--mode=predict", f"--checkpoint={checkpoint}",
                    f"--input={bad}", f"--output={afile}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is a file" in proc.stderr
