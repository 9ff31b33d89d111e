"""Micro-Net models and the constructor that builds one from ``config.model``."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from micronet_jax.models.micronet import MicroNet, check_input, resize_targets

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_config: ml_collections.ConfigDict) -> MicroNet:
    """Builds the Flax module that ``config.model`` describes, validating each switch by name."""
    if model_config.dtype not in DTYPES:
        raise ValueError(f"config model.dtype={model_config.dtype!r} is not one of {sorted(DTYPES)}")
    if model_config.variant not in (508, 252):
        raise ValueError(f"config model.variant={model_config.variant!r} is not 508 or 252")
    if not 0.0 <= model_config.dropout < 1.0:
        raise ValueError(f"config model.dropout={model_config.dropout!r} must be in [0, 1)")
    if model_config.width <= 0:
        raise ValueError(f"config model.width={model_config.width!r} must be positive")
    return MicroNet(
        variant=int(model_config.variant),
        multires=bool(model_config.multires),
        width=float(model_config.width),
        activation=str(model_config.activation),
        batch_norm=bool(model_config.batch_norm),
        dropout=float(model_config.dropout),
        num_classes=int(model_config.num_classes),
        dtype=DTYPES[model_config.dtype],
        remat=bool(model_config.remat),
        remat_heads=bool(model_config.remat_heads),
        transpose_impl=str(model_config.transpose_impl),
    )


__all__ = ["MicroNet", "build_model", "check_input", "resize_targets", "DTYPES"]
