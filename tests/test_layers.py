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
