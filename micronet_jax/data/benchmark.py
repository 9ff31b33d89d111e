"""Input-pipeline throughput: how many training patches per second the grain pipeline produces.

Measures only the data side (crop, augment, standardise, batch), so the number tells how many
worker processes a GPU host needs to keep the accelerator fed (``data.num_workers``)::

    python -m micronet_jax.data.benchmark --workers 0
    python -m micronet_jax.data.benchmark --source glas --root /path/to/glas --workers 4
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import numpy as np

from micronet_jax.config import base_config
from micronet_jax.data.pipeline import TrainSource, make_train_dataset


def _load(source: str, root: str | None, num_images: int) -> list:
    if source == "glas":
        if not root:
            raise SystemExit("--source glas needs --root")
        from micronet_jax.data.readers import load_glas

        return load_glas(root, "train")
    from micronet_jax.data.synthetic import make_synthetic_glands

    return make_synthetic_glands(num_images, 522, 775, seed=0)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Builds the training pipeline from the base config and prints its throughput; returns the numbers."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=("synthetic", "glas"), default="synthetic")
    p.add_argument("--root", default=None, help="GlaS folder (flat, official names) for --source glas")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes (data.num_workers)")
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--batches", type=int, default=20, help="timed batches (after one warm-up batch)")
    p.add_argument("--crop", type=int, default=508)
    p.add_argument("--patch", type=int, default=600)
    p.add_argument("--read-threads", type=int, default=1, help="grain prefetch threads per process")
    p.add_argument("--num-images", type=int, default=24, help="synthetic images")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = base_config().data
    cfg.num_workers = args.workers
    cfg.patch_size = args.patch
    cfg.crop_size = args.crop
    cfg.augment.enabled = not args.no_augment

    t0 = time.perf_counter()
    examples = _load(args.source, args.root, args.num_images)
    load_s = time.perf_counter() - t0
    source = TrainSource(examples, patch_size=args.patch, weight_map_config=cfg.weight_map)
    print(
        f"source={args.source} images={len(examples)} load={load_s:.2f}s "
        f"weight_maps={source.weight_map_seconds:.2f}s ({1e3 * source.weight_map_seconds / len(examples):.1f} ms/image)"
    )
    ds = make_train_dataset(
        source, cfg, global_batch_size=args.batch, seed=args.seed, read_threads=args.read_threads
    )
    it = iter(ds)
    try:
        t0 = time.perf_counter()
        batch = next(it)  # includes worker start-up (spawn + unpickling the source)
        first_s = time.perf_counter() - t0
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        del batch
        t0 = time.perf_counter()
        checksum = 0.0
        for _ in range(args.batches):
            b = next(it)
            checksum += float(np.asarray(b["weight"][:, 0, 0]).sum())  # touch the data
            del b
        dt = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    patches = args.batches * args.batch
    rate = patches / dt
    per_worker = rate / max(args.workers, 1)
    print(f"batch shapes {shapes}; first batch {first_s:.2f}s")
    print(
        f"workers={args.workers} read_threads={args.read_threads} crop={args.crop} batch={args.batch} "
        f"batches={args.batches}: {rate:.1f} patches/s total, {per_worker:.1f} patches/s per worker "
        f"({1e3 * dt / args.batches:.1f} ms/batch)"
    )
    return {"patches_per_s": rate, "per_worker": per_worker, "weight_map_s": source.weight_map_seconds}


if __name__ == "__main__":
    main()
