"""The embedded default: synthetic H&E-like glands, a reduced-width Micro-Net-508, CPU, a few minutes.

Runs with nothing but the package installed, and ends with a checkpoint, a GlaS-metric report and
overlay PNGs in the workdir:

    python -m micronet_jax.main --config configs/default.py --workdir runs/default

``configs/default.py:tiny`` is the same pipeline shrunk for tests (seconds per step, not minutes).
"""

from micronet_jax.config import base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.platform = "cpu"
    c.model.width = 1 / 16  # 4..128 channels instead of 64..2048: ~1/256 of the compute.
    c.model.dtype = "float32"  # bfloat16 is slow on CPUs; the GPU configs use it.
    # Two CPU devices, the batch of 2 split over them: XLA's CPU ops leave the cores idle much of a
    # step, and two programs fill the gaps (docs/benchmarks.md, issue #18). The heads are not
    # recomputed: at this width their stored activations are small, and recomputing them cost 1-4%.
    c.cpu_devices = 2
    c.model.remat_heads = False
    c.data.source = "synthetic"
    c.data.synthetic_num_train = 16
    c.data.synthetic_num_val = 4
    c.train.batch_size = 2
    c.train.epochs = 3
    c.train.patches_per_epoch = 64
    c.train.log_every = 5
    c.train.checkpoint_every = 32
    c.train.eval_every = 0  # Validate once, at the end.
    c.eval.split = "val"
    c.eval.tile_batch = 2
    c.eval.min_size = 200
    if arg == "tiny":
        c.model.width = 1 / 64
        c.data.synthetic_num_train = 3
        c.data.synthetic_num_val = 1
        c.data.synthetic_height = 300
        c.data.synthetic_width = 330
        c.data.patch_size = 520
        c.train.epochs = 2
        c.train.patches_per_epoch = 8  # 4 steps per epoch: the schedule and aux weight change.
        c.train.log_every = 1
        c.train.checkpoint_every = 2
        c.eval.tile_batch = 1
        c.eval.num_overlays = 1
        c.eval.min_size = 20
    elif arg:
        raise ValueError(f"configs/default.py takes no argument or ':tiny', not {arg!r}")
    return c
