"""The learning-rate schedule and the optimizer, from ``config.train`` (spec §4, §7.9).

Kept apart from :mod:`micronet_jax.losses` (what is minimised) because this is how it is minimised;
:func:`micronet_jax.core.make_setup` is the one caller that builds them for training.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(
    train_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The configured schedule over optimizer steps.

    paper: lr_e = lr0 * 10^(-e/5) for epoch e = 0, 1, ... (stepped per epoch, computed from lr0,
    spec §4, §7.9); constant; cosine: decay to 0 over the run. An optional linear warm-up precedes any.
    """
    lr0 = float(train_config.learning_rate)
    name = train_config.schedule
    if name == "paper":

        def schedule(step):
            epoch = jnp.floor_divide(step, steps_per_epoch)
            return lr0 * jnp.power(10.0, -epoch / 5.0)

    elif name == "constant":
        schedule = optax.constant_schedule(lr0)
    elif name == "cosine":
        schedule = optax.cosine_decay_schedule(lr0, max(1, total_steps - train_config.warmup_steps))
    else:
        raise ValueError(f"config train.schedule={name!r} is not one of 'paper', 'constant', 'cosine'")
    warmup = int(train_config.warmup_steps)
    if warmup > 0:
        ramp = optax.linear_schedule(0.0, lr0, warmup)
        return optax.join_schedules([ramp, schedule], [warmup])
    return schedule


def make_optimizer(
    train_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Adam (spec §7.9: the paper does not name it; Adam with betas 0.9/0.999 is the resolution)."""
    if train_config.optimizer not in ("adam", "adamw"):
        raise ValueError(f"config train.optimizer={train_config.optimizer!r} is not 'adam' or 'adamw'")
    parts = []
    if train_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    if train_config.optimizer == "adamw" or train_config.weight_decay > 0:
        parts.append(optax.adamw(schedule, train_config.b1, train_config.b2,
                                 weight_decay=train_config.weight_decay))
    else:
        parts.append(optax.adam(schedule, train_config.b1, train_config.b2))
    return optax.chain(*parts)
