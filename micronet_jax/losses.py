"""The paper's loss as pure functions (spec §4, §7.10, §8); the optimizer and schedule are in optim.py.

l = l_o + (l_a1 + l_a2 + l_a3) / epoch, with epoch counted from 1, where each l_k is a weighted
cross-entropy over the pixels of the batch with the U-Net weight map. Logits arrive in float32 and
the weight-map multiply and the reductions stay in float32, whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over batch and pixels of w(x) * -log p(x; y(x)).

    The paper writes a sum; the mean only rescales it, and using the same normalisation for all four
    outputs keeps the 1/epoch auxiliary weight meaningful (spec §8).
    """
    logits = logits.astype(jnp.float32)
    # One-hot rather than optax.softmax_cross_entropy_with_integer_labels: the same value, but the
    # integer-label form picks the label's logit with take_along_axis, whose gradient is a scatter-add
    # over every pixel, 4 per step, which XLA's CPU backend runs slowly (a profile of issue #18).
    # With 2 or 3 classes the one-hot product and its gradient are element-wise and fuse.
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    nll = optax.softmax_cross_entropy(logits, one_hot)
    return jnp.mean(weights.astype(jnp.float32) * nll)


def aux_weight(step: jax.Array, steps_per_epoch: int, enabled: bool = True) -> jax.Array:
    """1/epoch with epoch counted from 1 (spec §7.10): 1, 1/2, 1/3, ... per epoch; 0 when disabled."""
    if not enabled:
        return jnp.zeros((), jnp.float32)
    epoch = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32) + 1.0
    return 1.0 / epoch


def aux_steps_per_epoch(train_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> int:
    """Optimizer steps per epoch of the 1/epoch auxiliary weight (``train.aux_epochs``).

    None (the paper): the training epoch. N: ceil(total_steps / N), so the weight is 1/N at most
    N-ths into the run and never falls below 1/N.
    """
    n = train_config.get("aux_epochs")
    if n is None:
        return steps_per_epoch
    if int(n) < 1:
        raise ValueError(f"config train.aux_epochs={n!r} must be a positive integer or None")
    return max(1, -(-int(total_steps) // int(n)))


def micronet_loss(
    outputs: dict[str, jax.Array],
    labels: jax.Array,
    weights: jax.Array,
    aux_scale: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its parts: main plus ``aux_scale`` times the sum of the three auxiliary losses."""
    parts = {name: weighted_cross_entropy(logits, labels, weights) for name, logits in outputs.items()}
    aux = parts["aux1"] + parts["aux2"] + parts["aux3"]
    total = parts["main"] + aux_scale * aux
    return total, {f"loss_{k}": v for k, v in parts.items()}
