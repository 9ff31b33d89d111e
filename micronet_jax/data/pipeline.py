"""Training input pipeline on grain: random 600 patch -> random 508 crop -> augment -> standardise (spec §4).

Determinism is by construction, not by bookkeeping: every sample is a pure function of
``(seed, global sample index)``. Sample ``g`` draws everything (image, patch window, crop, augmentation)
from ``np.random.default_rng([seed, _STREAM_TAG, g])``, so the stream is bit-identical whatever the
number of grain worker processes, read threads or hosts, and wherever an iterator was restored.

Multi-host layout (``process_count`` = P, global batch B, per-process batch b = B / P): global step s
covers global sample indices ``s*B .. s*B + B - 1``; process p takes the contiguous block
``[s*B + p*b, s*B + (p+1)*b)``. The processes' blocks are disjoint and, concatenated in process order,
are exactly the single-process global batch, which is what ``jax.make_array_from_process_local_data``
expects for a batch axis sharded over processes in order.

Checkpointing the iterator with orbax (what :func:`micronet_jax.checkpointing.save_state` does)::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(...), data_iter=grain.checkpoint.CheckpointSave(it)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(...), data_iter=grain.checkpoint.CheckpointRestore(it)))
    # ``it`` (a fresh iterator from the same make_train_dataset call) now continues where the saved
    # one stopped. Without orbax: ``state = it.get_state()`` (a small JSON-able dict), later
    # ``it.set_state(state)``.

grain's handler writes one ``process_<p>-of-<P>.json`` per host (the process index comes from JAX).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from micronet_jax.data import augment as aug_lib
from micronet_jax.config import check_normalize, config_value
from micronet_jax.inputs import moments, standardize, standardize_with
from micronet_jax.data import targets as targets_lib
from micronet_jax.data import weight_map as wm_lib
from micronet_jax.data.resample import rescale_examples

logger = logging.getLogger(__name__)

# Separates this stream from any other numpy use of the same seed (e.g. a validation split or the
# synthetic generator), which would otherwise see correlated draws.
_STREAM_TAG = 0x7E1A
# Length of the (lazy) index range. grain datasets need a length; 2^40 steps is "infinite" for training.
_MAX_STEPS = 2**40


class LabelledImage(Protocol):
    """What the pipeline needs from an example (``readers.Example`` satisfies it)."""

    image: np.ndarray  # uint8 (H, W, 3)
    label: np.ndarray  # int (H, W) instance ids, 0 = background


def _plain(cfg: Any) -> dict[str, Any]:
    """A picklable plain dict of a ConfigDict/mapping (grain workers are spawned, not forked)."""
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}


class TrainSource:
    """The training images with their weight maps, computed once and padded to ``patch_size``.

    The weight map depends only on the full-resolution instance labels, so it is computed once here
    (spec §7.11) and afterwards only cropped and warped with the patch; recomputing it per sample would
    cost more than all augmentations together. Image, label and weight map are then reflect-padded
    to at least ``patch_size`` in both axes (see :func:`augment.pad_to_min` for why the label is
    reflected too). The object is pickled into every grain worker process.

    Attributes:
      images, labels, weights: per-example arrays, padded; labels keep their instance ids in the
        smallest unsigned dtype; ``weights`` is None when the weight map is disabled (the sampler then
        emits ones).
      weight_map_seconds: wall time of the weight-map computation (logged at construction).
    """

    def __init__(
        self,
        examples: Sequence[LabelledImage],
        *,
        patch_size: int = 600,
        weight_map_config: Any = None,
        target: str = "binary",
        boundary_width: int = 4,
        normalize: str = "crop",
        gap_width: int = 0,
    ):
        """Args:
        examples: objects with ``.image`` (uint8 H,W,3) and ``.label`` (int H,W instance ids).
        patch_size: minimum padded height/width (``data.patch_size``).
        weight_map_config: ``data.weight_map`` (enabled, w0, sigma, class_balance); None = enabled with
          the U-Net defaults.
        target, boundary_width: ``data.target`` and ``data.boundary_width``: the classes the
          sampler emits (:func:`micronet_jax.data.targets.class_map`) and the weight map balances.
        normalize: ``data.normalize``. "image" keeps each image's mean and std (``stats``, taken
          before padding, as inference takes them before tiling) for the sampler to standardise
          its crops with; "crop" leaves ``stats`` None and the sampler uses each crop's own.
        gap_width: ``data.gap_width``: gland pixels this close to another gland become background
          in the training labels (:func:`micronet_jax.data.targets.widen_gaps`), before the weight
          maps and the targets are made from them.
        """
        if len(examples) == 0:
            raise ValueError("TrainSource needs at least one example")
        cfg = _plain(weight_map_config)
        self.weight_map_enabled = bool(cfg.get("enabled", True))
        self.w0 = float(cfg.get("w0", 10.0))
        self.sigma = float(cfg.get("sigma", 5.0))
        self.class_balance = bool(cfg.get("class_balance", True))
        self.patch_size = int(patch_size)
        targets_lib.check_target(target)
        self.target = str(target)
        self.boundary_width = int(boundary_width)
        check_normalize(normalize)

        images = [np.asarray(e.image) for e in examples]
        labels = [np.asarray(e.label) for e in examples]
        for k, (im, lb) in enumerate(zip(images, labels)):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[:2] != lb.shape:
                raise ValueError(
                    f"example {k}: need uint8 image (H,W,3) and label (H,W), got "
                    f"{im.dtype} {im.shape} and {lb.shape}"
                )
        self.gap_width = int(gap_width)
        if self.gap_width:
            labels = [targets_lib.widen_gaps(lb, self.gap_width) for lb in labels]

        t0 = time.perf_counter()
        # scipy's distance transform holds the GIL: threads measured no faster (~1.7 s for GlaS).
        weights = [self._weight_map(lb) for lb in labels] if self.weight_map_enabled else None
        self.weight_map_seconds = time.perf_counter() - t0
        if self.weight_map_enabled:
            logger.info(
                "Weight maps for %d images in %.2f s (w0=%g, sigma=%g, class_balance=%s)",
                len(labels), self.weight_map_seconds, self.w0, self.sigma, self.class_balance,
            )

        self.stats: list[tuple[float, float]] | None = (
            [moments(im) for im in images] if normalize == "image" else None)
        self.images: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.weights: list[np.ndarray] | None = [] if weights is not None else None
        for k in range(len(images)):
            arrays = [images[k], labels[k]] + ([weights[k]] if weights is not None else [])
            padded = aug_lib.pad_to_min(arrays, self.patch_size)
            self.images.append(np.ascontiguousarray(padded[0]))
            self.labels.append(np.ascontiguousarray(_compact_ids(padded[1])))
            if self.weights is not None:
                self.weights.append(np.ascontiguousarray(padded[2], dtype=np.float32))

    @classmethod
    def from_config(cls, examples: Sequence[LabelledImage], data_config: Any) -> "TrainSource":
        """The source ``config.data`` describes (patch size, weight map, target, scale)."""
        scale = float(config_value(data_config, "scale", "data"))
        return cls(
            rescale_examples(examples, scale),
            patch_size=int(config_value(data_config, "patch_size", "data")),
            weight_map_config=config_value(data_config, "weight_map", "data"),
            target=str(config_value(data_config, "target", "data")),
            boundary_width=int(config_value(data_config, "boundary_width", "data")),
            normalize=str(config_value(data_config, "normalize", "data")),
            gap_width=int(config_value(data_config, "gap_width", "data")),
        )

    @classmethod
    def for_training(cls, data_config: Any) -> "TrainSource":
        """The training split of ``config.data``, read and prepared: what the trainer and the
        ablation runner train on."""
        from micronet_jax.data.sources import load_split

        return cls.from_config(load_split(data_config, "train"), data_config)

    def _weight_map(self, label: np.ndarray) -> np.ndarray:
        classes = None
        if self.target != "binary":
            classes = targets_lib.class_map(label, self.target, self.boundary_width)
        return wm_lib.unet_weight_map(
            label, w0=self.w0, sigma=self.sigma, class_balance=self.class_balance, classes=classes
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        w = self.weights[k] if self.weights is not None else None
        return self.images[k], self.labels[k], w


def _compact_ids(label: np.ndarray) -> np.ndarray:
    """Stores instance ids in the smallest unsigned dtype that holds them (GlaS: uint8).

    The source is copied into every spawned worker; int32 labels would be a third of its ~400 MB.
    """
    if label.size == 0 or label.min() < 0:
        return label
    top = int(label.max())
    for dtype in (np.uint8, np.uint16):
        if top <= np.iinfo(dtype).max:
            return label.astype(dtype)
    return label


class TrainSampler:
    """Maps a global sample index to one training sample dict; picklable for grain workers.

    Recipe (spec §4): pick an image uniformly, a uniformly random ``patch_size`` window in the padded
    image, then a uniformly random ``crop_size`` crop inside that window, then augment and standardise
    (with the crop's own statistics, or its whole image's under ``data.normalize="image"``).
    """

    def __init__(self, source: TrainSource, *, seed: int, crop_size: int, augment_config: Any):
        if seed < 0:
            raise ValueError(f"seed must be non-negative for numpy seeding, got {seed}")
        if crop_size > source.patch_size:
            raise ValueError(f"crop_size {crop_size} exceeds patch_size {source.patch_size}")
        self.source = source
        self.seed = int(seed)
        self.crop_size = int(crop_size)
        self.augment_config = _plain(augment_config)

    def __call__(self, global_index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, _STREAM_TAG, int(global_index)])
        k = int(rng.integers(len(self.source)))
        image, label, weight = self.source[k]
        arrays = [image, label] + ([weight] if weight is not None else [])
        arrays = aug_lib.random_crop(arrays, self.source.patch_size, rng)
        arrays = aug_lib.random_crop(arrays, self.crop_size, rng)
        image, label = arrays[0], arrays[1]
        if weight is None:
            weight = np.ones(label.shape, np.float32)
        else:
            weight = arrays[2]
        image, label, weight = aug_lib.augment_example(image, label, weight, self.augment_config, rng)
        return {
            "image": standardize(image) if self.source.stats is None
            else standardize_with(image, *self.source.stats[k]),
            # Classes from the warped instance ids (data.target); the ids stay out of the batch.
            "label": targets_lib.class_map(label, self.source.target, self.source.boundary_width),
            "weight": np.ascontiguousarray(weight, dtype=np.float32),
        }


class _LocalToGlobal:
    """Process-local sample index j -> global sample index (module docstring: multi-host layout)."""

    def __init__(self, sampler: TrainSampler, local_batch: int, global_batch: int, process_index: int):
        self.sampler = sampler
        self.local_batch = local_batch
        self.global_batch = global_batch
        self.process_index = process_index

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        step, k = divmod(int(j), self.local_batch)
        return self.sampler(step * self.global_batch + self.process_index * self.local_batch + k)


def make_train_dataset(
    examples: Sequence[LabelledImage] | TrainSource,
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    crop_size: int | None = None,
    read_threads: int = 1,
) -> grain.IterDataset:
    """An infinite, deterministic stream of per-process training batches.

    Args:
      examples: training examples (``.image``, ``.label``) or a prebuilt :class:`TrainSource` (reuse
        it to avoid recomputing weight maps; its own patch size and weight-map settings then apply).
      data_config: ``config.data`` (patch_size, crop_size, augment, weight_map, num_workers).
      global_batch_size: batch over all processes; must divide by ``process_count``.
      seed: non-negative data seed; the same seed gives bit-identical batches.
      process_index, process_count: this host's place (``jax.process_index()``/``process_count()``).
      crop_size: network input size; defaults to ``data_config.crop_size``.
      read_threads: grain prefetch threads per process (0 = compute batches synchronously). One
        thread already overlaps input with the accelerator step; more threads mostly fight over the
        GIL, so scale with ``num_workers`` (processes) instead.

    Returns:
      A ``grain.IterDataset``; ``iter()`` gives batches ``{"image": float32 (b,c,c,3),
      "label": int32 (b,c,c) in {0,1}, "weight": float32 (b,c,c)}`` with b = global/process_count.
      Its iterator supports ``get_state()``/``set_state()`` and ``grain.checkpoint.CheckpointSave``.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"invalid process_index={process_index} / process_count={process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}: "
            "every process must load the same number of samples per step"
        )
    local_batch = global_batch_size // process_count
    if isinstance(examples, TrainSource):
        source = examples
    else:
        source = TrainSource.from_config(examples, data_config)
    crop = int(crop_size if crop_size is not None else config_value(data_config, "crop_size", "data"))
    sampler = TrainSampler(source, seed=seed, crop_size=crop, augment_config=config_value(data_config, "augment", "data"))

    ds = grain.MapDataset.range(_MAX_STEPS * local_batch)
    ds = ds.map(_LocalToGlobal(sampler, local_batch, global_batch_size, process_index))
    ds = ds.batch(local_batch, drop_remainder=True)
    # Batches are built whole inside one thread/worker; prefetch a couple, not grain's default 500.
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, 2 * read_threads))
    it_ds = ds.to_iter_dataset(read_options)
    num_workers = int(config_value(data_config, "num_workers", "data") or 0)
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        # Worker w computes batches w, w + W, ...; grain interleaves them back in order, and each batch
        # depends only on its index, so the stream equals the 0-worker one.
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (tests, notebooks, the
    benchmark) nothing has parsed them and the first batch would raise UnparsedFlagAccessError. Marking
    them parsed keeps every default and does not stop a later ``FLAGS(argv)``."""
    from absl import flags  # grain depends on absl; imported here to keep the module import light.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
