"""Micro-Net-508 and Micro-Net-252 as Flax (linen) modules, NHWC, layer by layer as in the spec.

Section numbers (§n) refer to ``micronet_spec.md``. The forward pass returns float32 logits for the
main output and the three auxiliary outputs, each (N, S, S, num_classes) for an S x S input.

Why linen: the model is a pure function ``apply(variables, x)`` over a parameter pytree, which is what
the sharded train step, ``jax.eval_shape`` summaries and the vmapped multi-seed ablations need.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from micronet_jax.models.layers import ConvTranspose, conv, get_activation, kernel_init, max_pool_2x2

Dtype = Any

# Channel widths at width multiplier 1 (spec §1): group 1 (B1..B4), the 2048-wide bridge, group 3.
GROUP1_WIDTHS = (64, 128, 256, 512)
BRIDGE_WIDTH = 2048
VALID_VARIANTS = (508, 252)
# Feature-mask branches (§1 group 4): (index of the group-3 block it reads, from the last, kernel=stride).
FEATURE_MASK_FACTORS = (2, 4, 8)
# checkpoint_name of the heads' dropout keep-masks: the one thing head rematerialisation stores.
DROPOUT_MASK = "dropout_mask"


def resize_targets(size: int) -> list[int]:
    """Sizes of the bicubic resized-input branch for B1..B4: r1=(N-4)//2+4, r_{k+1}=(r_k-8)//2+4 (§1)."""
    sizes = [(size - 4) // 2 + 4]
    for _ in range(3):
        sizes.append((sizes[-1] - 8) // 2 + 4)
    return sizes


def scaled(channels: int, width: float) -> int:
    """Channel count under the width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


class DownBlock(nn.Module):
    """Group 1 block: conv, conv, max-pool; plus conv, conv on the bicubically resized input (§1)."""

    features: int
    resize_to: int
    multires: bool
    activation: str
    batch_norm: bool
    dtype: Dtype
    name_prefix: str = ""

    @nn.compact
    def __call__(self, x: jax.Array, image: jax.Array, train: bool) -> jax.Array:
        act = get_activation(self.activation)

        def maybe_bn(y: jax.Array, name: str) -> jax.Array:
            # TIAToolbox's placement (after the activation of conv1 and conv3); off in the paper (§7.5).
            if not self.batch_norm:
                return y
            return nn.BatchNorm(
                use_running_average=not train, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )(y)

        y = maybe_bn(act(conv(self.features, 3, self.dtype, "conv1")(x)), "bn1")
        y = act(conv(self.features, 3, self.dtype, "conv2")(y))
        y = max_pool_2x2(y)
        if not self.multires:
            return y
        n, _, _, c = image.shape
        # §7.15 / §8: resize the full-resolution (standardised) input each time, no antialiasing, to
        # stay close to PyTorch's F.interpolate(mode="bicubic", align_corners=False).
        # Interpolate in float32 (the input arrives in float32) and only then drop to the compute dtype.
        r = jax.image.resize(
            image.astype(jnp.float32), (n, self.resize_to, self.resize_to, c), method="cubic-pytorch",
            antialias=False,
        ).astype(self.dtype)
        r = maybe_bn(act(conv(self.features, 3, self.dtype, "conv3")(r)), "bn3")
        r = act(conv(self.features, 3, self.dtype, "conv4")(r))
        chex.assert_equal_shape_prefix([y, r], 3)
        return jnp.concatenate([y, r], axis=-1)  # [pooled, resized] as in TIAToolbox (§7.20).


class Bridge508(nn.Module):
    """B5 (conv, conv, pool, conv, conv) and B6 (convT 2/2, conv, conv, convT 5/1) of Micro-Net-508 (§1)."""

    features: int
    activation: str
    dtype: Dtype
    transpose_impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        act = get_activation(self.activation)
        f = self.features
        y = act(conv(f, 3, self.dtype, "B5_conv1")(x))
        y = act(conv(f, 3, self.dtype, "B5_conv2")(y))
        y = max_pool_2x2(y)
        y = act(conv(f, 3, self.dtype, "B5_conv3")(y))
        b5 = act(conv(f, 3, self.dtype, "B5_conv4")(y))
        y = ConvTranspose(f, 2, 2, self.dtype, self.transpose_impl, name="B6_up1")(b5)
        y = act(conv(f, 3, self.dtype, "B6_conv1")(y))
        y = act(conv(f, 3, self.dtype, "B6_conv2")(y))
        b6 = ConvTranspose(f, 5, 1, self.dtype, self.transpose_impl, name="B6_up2")(y)
        return b5, b6


class Bridge252(nn.Module):
    """B5 of Micro-Net-252: two convs, no pool and no B6 (§2)."""

    features: int
    activation: str
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        y = act(conv(self.features, 3, self.dtype, "B5_conv1")(x))
        return act(conv(self.features, 3, self.dtype, "B5_conv2")(y))


class UpBlock(nn.Module):
    """Group 3 block: convT 2/2, conv, conv, convT 5/1 on the main path; convT 5/1 on the skip;
    concat [main, skip]; 1x1 conv + activation (§1, §7.2-3)."""

    features: int
    activation: str
    dtype: Dtype
    transpose_impl: str

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        f, impl = self.features, self.transpose_impl
        y = ConvTranspose(f, 2, 2, self.dtype, impl, name="up1")(x)
        y = act(conv(f, 3, self.dtype, "conv1")(y))
        y = act(conv(f, 3, self.dtype, "conv2")(y))
        y = ConvTranspose(f, 5, 1, self.dtype, impl, name="up2")(y)
        s = ConvTranspose(f, 5, 1, self.dtype, impl, name="up3")(skip)
        chex.assert_equal_shape_prefix([y, s], 3)
        y = jnp.concatenate([y, s], axis=-1)
        return act(conv(f, 1, self.dtype, "fuse")(y))


class FeatureMask(nn.Module):
    """Group 4 branch: convT with kernel = stride = factor (C -> C/2), then conv3 + activation (§1)."""

    features: int
    factor: int
    activation: str
    dtype: Dtype
    transpose_impl: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        y = ConvTranspose(
            self.features, self.factor, self.factor, self.dtype, self.transpose_impl, name="up"
        )(x)
        return act(conv(self.features, 3, self.dtype, "conv")(y))


def named_mask_dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Element-wise dropout as ``flax.linen.Dropout`` computes it (keep with probability 1 - rate,
    scale kept values by 1 / (1 - rate); all zeros at rate 1), with the keep-mask named
    ``DROPOUT_MASK`` so that head rematerialisation saves the 1-byte mask instead of drawing the
    random bits again or storing the dropped copy of the features."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    return _apply_keep_mask(x, _dropout_keep_mask(x.shape, rate, key), rate)


def _dropout_keep_mask(shape: tuple[int, ...], rate: float, key: jax.Array) -> jax.Array:
    """The boolean keep-mask of :func:`named_mask_dropout`, named for head rematerialisation.

    At the paper's rate 0.5 every element is one fair coin, so each random 32-bit word is unpacked
    into 32 mask elements instead of drawing one 32-bit uniform per element as
    ``jax.random.bernoulli`` does: the same distribution (independent, kept with probability
    exactly 1/2) from 1/32 of the random bits. The heads draw 510x510x56 coins per patch at width
    1/16, and generating them was a quarter of the CPU training step (docs/benchmarks.md, #18).
    Other rates use ``jax.random.bernoulli``.
    """
    if rate == 0.5 and len(shape) >= 1:
        words = -(-shape[-1] // 32)
        bits = jax.random.bits(key, tuple(shape[:-1]) + (words,), jnp.uint32)
        unpacked = (bits[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
        keep = unpacked.reshape(tuple(shape[:-1]) + (words * 32,))[..., : shape[-1]] == 1
    else:
        keep = jax.random.bernoulli(key, 1.0 - rate, shape)
    return checkpoint_name(keep, DROPOUT_MASK)


def _apply_keep_mask(x: jax.Array, keep: jax.Array, rate: float) -> jax.Array:
    if rate >= 1.0:
        return jnp.zeros_like(x)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


class Head(nn.Module):
    """Dropout then an unpadded 3x3 conv to class logits, no activation (§1 groups 4-5, §7.7).

    Takes one feature map, or several (the main output, group 5, reads the concatenation of the
    three feature masks). For several, the conv over the concatenation is computed as the sum of
    one conv per source with the matching slice of the kernel: the same parameters (one ``kernel``
    of shape (3, 3, sum of channels, classes)), the same dropout mask (drawn once over the
    concatenated shape and sliced) and the same result up to float summation order, without ever
    materialising the 510x510x448 concatenation. Under head rematerialisation nothing but the
    sources and the mask is stored; on the CPU, XLA's conv over 28 channels at 510x510 (width 1/16)
    is 4x slower than the three convs over 4, 8 and 16 channels (docs/benchmarks.md, issue #18).
    """

    num_classes: int
    dropout: float
    dtype: Dtype

    @nn.compact
    def __call__(self, features: jax.Array | Sequence[jax.Array], train: bool) -> jax.Array:
        parts = list(features) if isinstance(features, (list, tuple)) else [features]
        sizes = [p.shape[-1] for p in parts]
        if train and self.dropout > 0:
            full_shape = parts[0].shape[:-1] + (sum(sizes),)
            keep = _dropout_keep_mask(full_shape, self.dropout, self.make_rng("dropout"))
            offsets = np.cumsum([0] + sizes)
            parts = [
                _apply_keep_mask(p, keep[..., a:b], self.dropout)
                for p, a, b in zip(parts, offsets[:-1], offsets[1:])
            ]
        y = SplitInputConv(self.num_classes, 3, self.dtype, name="conv")(parts)
        # Logits leave the model in float32 so log-softmax and the weighted loss run in float32.
        return y.astype(jnp.float32)


class SplitInputConv(nn.Module):
    """A VALID conv over the channel-concatenation of ``parts``, as a sum of one conv per part.

    Parameters and initialisation are those of :func:`~micronet_jax.models.layers.conv` (``kernel``
    (k, k, sum of channels, features), Glorot-uniform over the full fan-in, zero ``bias``), so a
    checkpoint does not depend on how the input is split.
    """

    features: int
    kernel_size: int
    dtype: Dtype

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
        k = self.kernel_size
        cin = sum(p.shape[-1] for p in parts)
        kernel = self.param("kernel", kernel_init, (k, k, cin, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
        y, start = None, 0
        for p in parts:
            c = p.shape[-1]
            z = jax.lax.conv_general_dilated(
                p.astype(self.dtype), kernel[:, :, start:start + c], (1, 1), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            y = z if y is None else y + z
            start += c
        return y + bias


class MicroNet(nn.Module):
    """Micro-Net-508 (glands) or Micro-Net-252 (nuclei/cells).

    Attributes:
      variant: 508 or 252; the input must be exactly variant x variant (the graph balances each
        decoder stage against its skip at one size only, §1), so whole images go through tiling.
      multires: the bicubic resized-input branches of B1..B4; False is Micro-Net-minus (§6, §7.21).
      width: multiplier on every channel count (1.0 = the paper).
      activation: tanh (paper), relu, gelu or elu.
      batch_norm: BatchNorm after conv1/conv3 of B1..B4 (TIAToolbox); off in the paper.
      dropout: rate of the element-wise dropout before every head conv.
      num_classes: output classes (2 = background, gland).
      dtype: compute dtype (float32 or bfloat16); parameters are float32 either way.
      remat: rematerialise each block in the backward pass to save activation memory.
      remat_heads: recompute the four heads (concatenation, dropout, 3x3 conv) in the backward pass
        from their inputs and dropout masks instead of storing their full-resolution inputs. The
        heads are ~0.6% of the forward FLOPs (~0.2% of a training step) but, stored, 0.65-0.87 GiB of
        bf16 activations per 508 patch (docs/benchmarks.md, "Activation memory"). The result is
        the same either way.
      transpose_impl: "fast" or "xla" lowering of the transposed convs (same parameters).
    """

    variant: int = 508
    multires: bool = True
    width: float = 1.0
    activation: str = "tanh"
    batch_norm: bool = False
    dropout: float = 0.5
    num_classes: int = 2
    dtype: Dtype = jnp.float32
    remat: bool = False
    remat_heads: bool = True
    transpose_impl: str = "fast"

    def _block(self, cls: type[nn.Module], **kwargs: Any) -> nn.Module:
        """Instantiates a block, wrapped in ``nn.remat`` when rematerialisation is on."""
        if self.remat:
            # `train` is a Python bool that selects code paths, so it must stay static under remat.
            static = (3,) if cls is DownBlock else ()
            cls = nn.remat(cls, static_argnums=static)
        return cls(**kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        check_input(x, self.variant)
        w = lambda c: scaled(c, self.width)  # noqa: E731 - a one-line width helper reads best inline.
        common = dict(activation=self.activation, dtype=self.dtype)
        image = x.astype(jnp.float32)

        # Group 1: down path with multi-resolution input.
        skips = []
        y = x.astype(self.dtype)
        for i, (c, r) in enumerate(zip(GROUP1_WIDTHS, resize_targets(self.variant)), start=1):
            y = self._block(
                DownBlock,
                features=w(c),
                resize_to=r,
                multires=self.multires,
                batch_norm=self.batch_norm,
                name=f"B{i}",
                **common,
            )(y, image, train)
            self.sow("intermediates", f"B{i}_out", y)
            skips.append(y)

        # Group 2: the bridge.
        if self.variant == 508:
            b5, y = self._block(
                Bridge508, features=w(BRIDGE_WIDTH), transpose_impl=self.transpose_impl,
                name="B5_B6", **common,
            )(y)
            self.sow("intermediates", "B5_out", b5)
            self.sow("intermediates", "B6_out", y)
            first_up = 7
        else:
            y = self._block(Bridge252, features=w(BRIDGE_WIDTH), name="B5", **common)(y)
            self.sow("intermediates", "B5_out", y)
            first_up = 6

        # Group 3: up path; widths mirror group 1 at twice the channels, skips in reverse order.
        ups = []
        for j, (c, skip) in enumerate(zip(reversed(GROUP1_WIDTHS), reversed(skips))):
            name = f"B{first_up + j}"
            y = self._block(
                UpBlock, features=w(2 * c), transpose_impl=self.transpose_impl, name=name, **common
            )(y, skip)
            self.sow("intermediates", f"{name}_out", y)
            ups.append((y, 2 * c))

        # Group 4: feature masks from the last three up blocks (FM1 from the last, at x2).
        feature_masks = []
        for k, ((source, c), factor) in enumerate(
            zip(reversed(ups[1:]), FEATURE_MASK_FACTORS), start=1
        ):
            fm = self._block(
                FeatureMask,
                features=w(c // 2),
                factor=factor,
                transpose_impl=self.transpose_impl,
                name=f"FM{k}",
                **common,
            )(source)
            self.sow("intermediates", f"FM{k}_out", fm)
            feature_masks.append(fm)

        head_cls = Head
        if self.remat_heads:
            head_cls = nn.remat(
                Head, static_argnums=(2,),
                policy=jax.checkpoint_policies.save_only_these_names(DROPOUT_MASK),
            )
        head = dict(num_classes=self.num_classes, dropout=self.dropout, dtype=self.dtype)
        outputs = {
            f"aux{k}": head_cls(name=f"aux{k}_head", **head)(fm, train)
            for k, fm in enumerate(feature_masks, start=1)
        }
        # Group 5: the main output on the concatenated (un-dropped) feature masks. The head does the
        # concatenation itself; this copy only feeds `intermediates` (dead code otherwise).
        self.sow("intermediates", "concat_out", jnp.concatenate(feature_masks, axis=-1))
        outputs["main"] = head_cls(name="main_head", **head)(tuple(feature_masks), train)
        expected = (x.shape[0], self.variant, self.variant, self.num_classes)
        for out in outputs.values():
            chex.assert_shape(out, expected)
            chex.assert_type(out, jnp.float32)
        return outputs


def check_input(x: jax.Array, variant: int) -> None:
    """Rejects anything but (N, variant, variant, 3) with a message that says what to do instead."""
    if variant not in VALID_VARIANTS:
        raise ValueError(f"config model.variant={variant!r} is not one of {VALID_VARIANTS}")
    if x.ndim != 4 or x.shape[1:] != (variant, variant, 3):
        raise ValueError(
            f"Micro-Net-{variant} accepts only inputs of shape (N, {variant}, {variant}, 3) "
            f"(NHWC RGB); got {tuple(x.shape)}. Each decoder stage balances its skip at exactly one "
            f"input size ({variant} for this variant; valid variants: {VALID_VARIANTS}), so images "
            f"of any other size must go through tiled inference: micronet_jax.infer.tiled_predict."
        )
