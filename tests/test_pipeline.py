"""grain training pipeline: determinism, resume, multi-host sharding and the weight-map cache.

Small images (160x200, patch 128, crop 96) keep every test fast on a 2-core machine.
"""

import types

import grain
import numpy as np
import pytest

from micronet_jax.config import base_config
from micronet_jax.data import pipeline
from micronet_jax.data.pipeline import TrainSource, make_train_dataset

CROP = 96


def _example(seed: int, h: int = 160, w: int = 200) -> types.SimpleNamespace:
    """Pale background with a few purple disk 'glands', some close together (non-zero gap weights)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:h, :w]
    label = np.zeros((h, w), np.int32)
    image = np.full((h, w, 3), (230, 215, 225), np.uint8)
    for inst in range(1, 6):
        cy, cx, r = rng.integers(15, h - 15), rng.integers(15, w - 15), rng.integers(8, 22)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        label[disk] = inst
        image[disk] = (150, 70, 160)
    image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
    return types.SimpleNamespace(image=image, label=label)


@pytest.fixture(scope="module")
def examples():
    return [_example(s) for s in range(4)]


@pytest.fixture()
def data_config():
    c = base_config().data
    c.patch_size = 128
    c.crop_size = CROP
    c.num_workers = 0
    return c


def _take(ds, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(ds)
    return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batch_format(examples, data_config):
    (batch,) = _take(make_train_dataset(examples, data_config, global_batch_size=3, seed=0), 1)
    assert batch["image"].shape == (3, CROP, CROP, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, CROP, CROP) and batch["label"].dtype == np.int32
    assert batch["weight"].shape == (3, CROP, CROP) and batch["weight"].dtype == np.float32
    assert set(np.unique(batch["label"])) <= {0, 1}
    np.testing.assert_allclose(batch["image"].mean(axis=(1, 2, 3)), 0.0, atol=1e-4)  # per-image standardised
    assert batch["weight"].min() > 0

    data_config.weight_map.enabled = False
    (batch,) = _take(make_train_dataset(examples, data_config, global_batch_size=2, seed=0), 1)
    assert (batch["weight"] == 1.0).all()


def test_same_seed_is_bitwise_identical_and_seed_matters(examples, data_config):
    a = _take(make_train_dataset(examples, data_config, global_batch_size=2, seed=7), 3)
    b = _take(make_train_dataset(examples, data_config, global_batch_size=2, seed=7), 3)
    _assert_batches_equal(a, b)
    c = _take(make_train_dataset(examples, data_config, global_batch_size=2, seed=8), 3)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    # Consecutive batches differ too (the stream is not a repeat of one batch).
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_get_state_set_state_resumes_exactly(examples, data_config):
    ds = make_train_dataset(examples, data_config, global_batch_size=2, seed=1)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]
    fresh = iter(make_train_dataset(examples, data_config, global_batch_size=2, seed=1))
    fresh.set_state(state)
    _assert_batches_equal([{k: np.array(v) for k, v in next(fresh).items()} for _ in range(2)], expected)


def test_orbax_checkpoint_manager_round_trip(examples, data_config, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    ds = make_train_dataset(examples, data_config, global_batch_size=2, seed=3)
    it = iter(ds)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]

    fresh = iter(make_train_dataset(examples, data_config, global_batch_size=2, seed=3))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 3
        mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal([{k: np.array(v) for k, v in next(fresh).items()} for _ in range(2)], expected)


def test_two_process_shards_concatenate_to_single_process_batch(examples, data_config):
    source = TrainSource(examples, patch_size=128, weight_map_config=data_config.weight_map)
    single = _take(make_train_dataset(source, data_config, global_batch_size=4, seed=5), 2)
    parts = [
        _take(
            make_train_dataset(source, data_config, global_batch_size=4, seed=5, process_index=p, process_count=2),
            2,
        )
        for p in range(2)
    ]
    for step in range(2):
        for k in ("image", "label", "weight"):
            assert parts[0][step][k].shape[0] == 2
            joined = np.concatenate([parts[0][step][k], parts[1][step][k]])
            np.testing.assert_array_equal(joined, single[step][k])
        # Disjoint: no sample of process 0 reappears in process 1 at any step.
        imgs0 = [x for b in parts[0] for x in b["image"]]
        imgs1 = [x for b in parts[1] for x in b["image"]]
        assert not any(np.array_equal(a, b) for a in imgs0 for b in imgs1)


def test_indivisible_batch_raises(examples, data_config):
    with pytest.raises(ValueError, match="not divisible by process_count=2"):
        make_train_dataset(examples, data_config, global_batch_size=3, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="crop_size"):
        make_train_dataset(examples, data_config, global_batch_size=2, seed=0, crop_size=200)


def test_weight_maps_are_computed_once(examples, data_config, monkeypatch):
    calls = []
    original = pipeline.wm_lib.unet_weight_map

    def counting(label, **kwargs):
        calls.append(label.shape)
        return original(label, **kwargs)

    monkeypatch.setattr(pipeline.wm_lib, "unet_weight_map", counting)
    source = TrainSource(examples, patch_size=128, weight_map_config=data_config.weight_map)
    assert len(calls) == len(examples)
    assert source.weight_map_seconds >= 0
    assert all(im.shape[:2] == (160, 200) and w.shape == (160, 200) for im, w in zip(source.images, source.weights))
    _take(make_train_dataset(source, data_config, global_batch_size=4, seed=0), 5)
    assert len(calls) == len(examples)


def test_small_images_are_padded_to_patch_size(data_config):
    small = [_example(0, h=100, w=90)]
    source = TrainSource(small, patch_size=128, weight_map_config=data_config.weight_map)
    assert source.images[0].shape == (128, 128, 3) and source.labels[0].shape == (128, 128)
    (batch,) = _take(make_train_dataset(source, data_config, global_batch_size=2, seed=0), 1)
    assert batch["image"].shape == (2, CROP, CROP, 3)


@pytest.mark.slow
def test_one_worker_process_matches_in_process(examples, data_config):
    expected = _take(make_train_dataset(examples, data_config, global_batch_size=2, seed=11), 4)
    data_config.num_workers = 1
    it = iter(make_train_dataset(examples, data_config, global_batch_size=2, seed=11))
    try:
        got = [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]
        state = it.get_state()
        got += [{k: np.array(v) for k, v in next(it).items()} for _ in range(2)]
    finally:
        it.close()
    _assert_batches_equal(got, expected)
    resumed = iter(make_train_dataset(examples, data_config, global_batch_size=2, seed=11))
    try:
        resumed.set_state(state)
        tail = [{k: np.array(v) for k, v in next(resumed).items()} for _ in range(2)]
    finally:
        resumed.close()
    _assert_batches_equal(tail, expected[2:])


def test_image_normalisation_standardises_crops_with_their_images_statistics(examples, data_config):
    """data.normalize="image": a training crop is standardised with the mean and std of the image it
    was cut from (as inference standardises each tile with the whole image's), not with its own."""
    from micronet_jax.inputs import moments, standardize

    data_config.augment.enabled = False
    data_config.normalize = "image"
    source = TrainSource.from_config(examples, data_config)
    assert source.stats == [moments(e.image) for e in examples]
    sampler = pipeline.TrainSampler(source, seed=0, crop_size=CROP, augment_config=data_config.augment)
    for index in range(4):
        out = sampler(index)["image"]
        # Undo the standardisation with each image's statistics: exactly one gives back a uint8 crop
        # of that image.
        found = 0
        for k, (mean, std) in enumerate(source.stats):
            raw = out * (255.0 * std) + 255.0 * mean
            if np.abs(raw - np.rint(raw)).max() > 1e-3:
                continue
            raw = np.rint(raw).astype(np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(
                source.images[k].astype(np.int64), (CROP, CROP, 3))[..., 0, :, :, :]
            found += int((windows == raw).all(axis=(-3, -2, -1)).any())
        assert found == 1
        # Not the crop's own standardisation, which the default ("crop") would give.
        assert abs(float(out.mean())) > 1e-3 or abs(float(out.std()) - 1.0) > 1e-3
        assert np.abs(out - standardize(np.rint(raw).astype(np.uint8))).max() > 1e-3

    data_config.normalize = "tile"
    with pytest.raises(ValueError, match="data.normalize='tile'"):
        TrainSource.from_config(examples, data_config)
