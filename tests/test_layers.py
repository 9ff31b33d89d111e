"""The fast transposed-conv lowerings compute exactly what flax.linen.ConvTranspose computes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.models.layers import ConvTranspose, get_activation


@pytest.mark.parametrize("kernel,stride", [(2, 2), (4, 4), (8, 8), (5, 1)])
@pytest.mark.parametrize("impl", ["fast", "xla"])
def test_conv_transpose_matches_flax(kernel, stride, impl):
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 5))
    ours = ConvTranspose(6, kernel, stride, jnp.float32, impl)
    params = ours.init(jax.random.key(1), x)
    # Random biases too, so a wrong bias broadcast would show.
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    reference = nn.ConvTranspose(6, (kernel, kernel), strides=(stride, stride), padding="VALID")
    ref_params = reference.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(params, ref_params)
    got = ours.apply(params, x)
    want = reference.apply(params, x)
    assert got.shape == (2, (7 - 1) * stride + kernel, (9 - 1) * stride + kernel, 6)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_transpose_impl_is_rejected():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="transpose_impl"):
        ConvTranspose(3, 2, 2, jnp.float32, "cudnn").init(jax.random.key(0), x)


def test_unknown_activation_names_the_key():
    with pytest.raises(ValueError, match="model.activation='swish'"):
        get_activation("swish")
    np.testing.assert_allclose(get_activation("tanh")(jnp.ones(())), np.tanh(1.0), rtol=1e-6)


@pytest.mark.parametrize("kernel,stride", [(5, 1), (8, 8)])
def test_fast_conv_transpose_gradients_match_flax(kernel, stride):
    """The CPU-friendly lowerings (explicit pad, matmul + depth-to-space) must differentiate the same."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 5))
    ours = ConvTranspose(6, kernel, stride, jnp.float32, "fast")
    params = ours.init(jax.random.key(1), x)
    reference = nn.ConvTranspose(6, (kernel, kernel), strides=(stride, stride), padding="VALID")
    loss = lambda m: lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x)) ** 2)  # noqa: E731
    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_split_input_conv_is_the_conv_of_the_concatenation():
    from micronet_jax.models.micronet import SplitInputConv

    parts = [jax.random.normal(jax.random.key(i), (2, 11, 13, c)) for i, c in enumerate((4, 8, 16))]
    split = SplitInputConv(3, 3, jnp.float32)
    params = split.init(jax.random.key(5), parts)
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(6), p.shape), params)
    reference = nn.Conv(3, (3, 3), padding="VALID")
    chex.assert_trees_all_equal_shapes(params, reference.init(jax.random.key(5), jnp.concatenate(parts, -1)))

    def loss_split(p, parts):
        return jnp.sum(jnp.tanh(split.apply(p, parts)) ** 2)

    def loss_concat(p, parts):
        return jnp.sum(jnp.tanh(reference.apply(p, jnp.concatenate(parts, -1))) ** 2)

    chex.assert_trees_all_close(
        split.apply(params, parts), reference.apply(params, jnp.concatenate(parts, -1)), atol=1e-5, rtol=1e-5
    )
    chex.assert_trees_all_close(
        jax.grad(loss_split, argnums=(0, 1))(params, parts),
        jax.grad(loss_concat, argnums=(0, 1))(params, parts), atol=1e-4, rtol=1e-5,
    )
