"""Full-width Micro-Net-508 on generated glands: a GPU smoke and benchmark run that needs no data.

    python -m micronet_jax.main --config configs/synthetic_508.py --workdir runs/synthetic
"""

from micronet_jax.config import base_config


def get_config():
    c = base_config()
    c.data.source = "synthetic"
    c.data.synthetic_num_train = 32
    c.data.synthetic_num_val = 4
    c.data.num_workers = 8
    c.train.batch_size = 8
    c.train.epochs = 1
    c.train.patches_per_epoch = 4000
    c.train.checkpoint_every = 250
    c.train.eval_every = 0
    return c
