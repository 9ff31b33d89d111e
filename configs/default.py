"""The embedded default: synthetic H&E-like glands, a reduced-width Micro-Net-508, CPU, a few minutes.

Runs with nothing but the package installed, and ends with a checkpoint, a GlaS-metric report and
overlay PNGs in the workdir:

    python -m micronet_jax.main --config configs/default.py --workdir runs/default
"""

from micronet_jax.config import base_config


def get_config():
    c = base_config()
    c.platform = "cpu"
    c.model.width = 1 / 16  # 4..128 channels instead of 64..2048: ~1/256 of the compute.
    c.model.dtype = "float32"  # bfloat16 is slow on CPUs; the GPU configs use it.
    c.data.source = "synthetic"
    c.data.synthetic_num_train = 16
    c.data.synthetic_num_val = 4
    c.train.batch_size = 2
    c.train.epochs = 4
    c.train.patches_per_epoch = 80
    c.train.learning_rate = 1e-3
    c.train.log_every = 5
    c.train.checkpoint_every = 40
    c.train.eval_every = 0  # Validate once, at the end.
    c.eval.split = "val"
    c.eval.tile_batch = 2
    c.eval.min_size = 200
    return c
