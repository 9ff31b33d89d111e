"""Building blocks of Micro-Net: unpadded 3x3 convs and transposed convs with a fast lowering.

Why a custom transposed conv: Micro-Net has two kinds of transposed convolution, and XLA's default
lowering of ``lax.conv_transpose`` (a conv over a zero-dilated input) wastes most of the work on both
(issue #6 measured 26.5 patches/s on an H100 against 50.8 with the rewrite):

* kernel == stride (2x2/s2 in the up blocks, 4x4/s4 and 8x8/s8 in the feature-mask branches): the
  output tiles never overlap, so the layer is one matmul per input pixel followed by depth-to-space.
* 5x5 stride 1, VALID (out = in + 4): identical to an ordinary conv over the input zero-padded by
  4 pixels, with the same (unflipped) kernel.

:class:`ConvTranspose` keeps exactly the parameters of ``flax.linen.ConvTranspose`` (``kernel`` of shape
(k, k, Cin, Cout) and ``bias``), so checkpoints and parameter counts do not depend on the lowering;
``tests/test_layers.py`` proves both lowerings numerically equal to ``flax.linen.ConvTranspose``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# Spec §7.19: Glorot-uniform kernels and zero biases (the Keras/TF default the paper's code used).
kernel_init = nn.initializers.glorot_uniform()

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "elu": nn.elu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by config name, with an error that lists the valid names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"config model.activation={name!r} is not one of {sorted(ACTIVATIONS)}"
        ) from None


def conv(features: int, kernel: int, dtype: Dtype, name: str | None = None) -> nn.Conv:
    """An unpadded ("VALID") conv with bias, float32 parameters and ``dtype`` compute (spec §1, §8)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        padding="VALID",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


@jax.checkpoint
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2, VALID (an odd last row or column is dropped), as a reshape + max.

    The same values as ``flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")``, and the
    same gradient except at exact ties inside a window, where this one shares the gradient between
    the tied elements instead of giving it to one (after tanh ties do not occur; after ReLU they are
    zeros, whose gradient ReLU discards anyway). Why: XLA's CPU backend runs ``max_pool``'s gradient
    as a reduce-window that tracks argmax indices with four materialised iotas, and this form as
    element-wise compares: 2x faster for the pool's gradient in isolation (issue #18).
    Rematerialised (``jax.checkpoint``): the backward pass keeps only the input, as ``max_pool``
    does, and recomputes the cheap max instead of also keeping the pooled output.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvTranspose(nn.Module):
    """A VALID transposed conv, out = (in - 1) * stride + kernel, with a selectable lowering.

    Attributes:
      features: output channels.
      kernel_size: square kernel size k.
      stride: square stride s; only k == s or s == 1 occur in Micro-Net (others fall back to XLA).
      dtype: compute dtype; parameters stay float32.
      impl: "fast" (matmul + depth-to-space, or padded conv) or "xla" (``lax.conv_transpose``).
    """

    features: int
    kernel_size: int
    stride: int
    dtype: Dtype = jnp.float32
    impl: str = "fast"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.impl not in ("fast", "xla"):
            raise ValueError(f"config model.transpose_impl={self.impl!r} is not 'fast' or 'xla'")
        if self.impl == "fast" and k == s:
            y = _depth_to_space_transpose(x, kernel)
        elif self.impl == "fast" and s == 1:
            # A stride-1 VALID transposed conv is a correlation of the (k-1)-padded input with the
            # same kernel: lax.conv_transpose without transpose_kernel does not flip it. The padding
            # is an explicit jnp.pad, not the conv's own: the kernel gradient is then an ordinary
            # VALID conv, which XLA's CPU backend runs 4-10x faster than the gradient of a padded
            # conv (that one lowers to a slow loop nest; issue #18 profile in docs/benchmarks.md).
            pad = k - 1
            y = jax.lax.conv_general_dilated(
                jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))),
                kernel,
                window_strides=(1, 1),
                padding="VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        else:
            y = jax.lax.conv_transpose(
                x, kernel, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + bias


def _depth_to_space_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A kernel == stride transposed conv as one matmul per pixel, then depth-to-space.

    Each input pixel (i, j) writes its own k x k output tile: out[i*k + a, j*k + b] = x[i, j] @ W[a, b],
    where W is the kernel flipped in both spatial axes (``lax.conv_transpose`` correlates the dilated
    input with the unflipped kernel, which reverses the tile order).

    Written as a matmul to (pixels, k*k*Cout) and one transpose of whole (k, Cout) rows, rather than
    as one einsum straight into the tiled layout: autodiff of that einsum gave XLA's CPU backend a
    gradient that transposes the output cotangent element by element (the largest single op of the
    CPU step), while the gradient of this form is two ordinary matmuls and the reverse row transpose.
    The 8x8 branch's gradient at width 1/16 went from 202 to 65 ms in isolation (issue #18).
    """
    n, h, w, cin = x.shape
    k = kernel.shape[0]
    cout = kernel.shape[-1]
    flipped = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(cin, k * k * cout)
    # On the 4-D input (not a reshaped copy), so autodiff keeps the same residual as the layers
    # around it; XLA lowers it to the same 2-D matmul.
    tiles = jnp.einsum("nhwc,cf->nhwf", x, flipped).reshape(n, h, w, k, k, cout)
    return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * k, w * k, cout)
