"""A layer table for Micro-Net built from shapes alone, so summarising 457 M parameters allocates nothing.

The table is made by tracing one forward pass under ``jax.eval_shape`` with a Flax method interceptor
that records every conv and transposed conv: its output shape, its parameters and its multiply-adds.
The MAC count is analytic (output pixels x k^2 x Cin x Cout for a conv, input pixels x k^2 x Cin x Cout
for a transposed conv), which is also what the benchmark uses for TFLOP/s and MFU: XLA's own
``cost_analysis`` undercounts cuDNN convs on GPU (jax_notes.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax.models.layers import ConvTranspose
from micronet_jax.models.micronet import MicroNet, SplitInputConv


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One parameterised layer of the network, for a batch of one."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``ShapeDtypeStruct``s."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model: MicroNet, batch: int = 1) -> dict[str, Any]:
    """The model's variables as ``ShapeDtypeStruct``s (no memory is allocated)."""
    x = jax.ShapeDtypeStruct((batch, model.variant, model.variant, 3), jnp.float32)
    variables = jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)
    return {k: v for k, v in variables.items() if k != "intermediates"}


def layer_table(model: MicroNet) -> list[LayerRow]:
    """Every conv, transposed conv and BatchNorm of ``model`` in call order, for one input patch."""
    rows: list[LayerRow] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(
            module, (nn.Conv, SplitInputConv, ConvTranspose, nn.BatchNorm)
        ):
            return out
        params = module.variables.get("params", {})
        n_params = count_params(params)
        x = args[0]
        if isinstance(module, (nn.Conv, SplitInputConv)):
            kh, kw, cin, cout = params["kernel"].shape
            macs = math.prod(out.shape[1:3]) * kh * kw * cin * cout
            kind = f"conv {kh}x{kw}"
        elif isinstance(module, ConvTranspose):
            kh, kw, cin, cout = params["kernel"].shape
            macs = math.prod(x.shape[1:3]) * kh * kw * cin * cout
            kind = f"convT {kh}x{kw}/s{module.stride}"
        else:
            macs = 0
            kind = "batchnorm"
        rows.append(LayerRow("/".join(module.path), kind, tuple(out.shape[1:]), n_params, macs))
        return out

    variables = abstract_variables(model)
    x = jax.ShapeDtypeStruct((1, model.variant, model.variant, 3), jnp.float32)

    def forward(variables, x):
        with nn.intercept_methods(record):
            return model.apply(variables, x, train=False)

    jax.eval_shape(forward, variables, x)
    return rows


def forward_flops(model: MicroNet) -> float:
    """Forward FLOPs (2 x MACs) of one patch: 1.337e12 for the full-width Micro-Net-508 (spec §1)."""
    return 2.0 * sum(row.macs for row in layer_table(model))


def stored_activation_bytes(model: MicroNet) -> float:
    """Bytes per input patch that autodiff keeps from the forward pass for the backward pass.

    These residuals are what ``remat`` and ``remat_heads`` trade for recomputation, and with the
    optimizer state they set a training step's device memory. They are read off the VJP of a
    training forward (dropout on) plus a log-softmax loss, traced under ``jax.eval_shape``, so nothing
    is allocated and the figure does not depend on the backend. Per patch = residuals at batch 2
    minus batch 1, which cancels the batch-independent ones (the weights, and their bf16 copies).
    The compiler may still schedule buffers differently, so this guides, not replaces, a measured peak.
    """

    def residual_bytes(batch: int) -> int:
        variables = abstract_variables(model)
        x = jax.ShapeDtypeStruct((batch, model.variant, model.variant, 3), jnp.float32)

        def residuals(variables, x, key):
            def loss(params):
                outputs, _ = model.apply(
                    {**variables, "params": params}, x, train=True, rngs={"dropout": key},
                    mutable=["batch_stats"],
                )
                return sum(jnp.mean(jax.nn.log_softmax(o)) for o in outputs.values())

            _, vjp_fn = jax.vjp(loss, variables["params"])
            return jax.tree.leaves(vjp_fn)

        leaves = jax.eval_shape(residuals, variables, x, jax.random.key(0))
        return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in leaves)

    return float(residual_bytes(2) - residual_bytes(1))


def format_summary(model: MicroNet) -> str:
    """The text printed by ``--mode=summary``: the layer table, total parameters, forward FLOPs, and
    the weight, optimizer-state and stored-activation memory."""
    rows = layer_table(model)
    total = count_params(abstract_variables(model).get("params", {}))
    name_w = max(len(r.name) for r in rows) + 2
    lines = [
        f"Micro-Net-{model.variant}  multires={model.multires}  width={model.width}  "
        f"activation={model.activation}  batch_norm={model.batch_norm}  "
        f"classes={model.num_classes}  dtype={jnp.dtype(model.dtype).name}",
        f"{'layer':<{name_w}}{'op':<14}{'output (H, W, C)':<22}{'params':>14}{'GMAC':>10}",
        "-" * (name_w + 60),
    ]
    for r in rows:
        lines.append(
            f"{r.name:<{name_w}}{r.kind:<14}{str(r.output_shape):<22}{r.params:>14,}"
            f"{r.macs / 1e9:>10.2f}"
        )
    macs = sum(r.macs for r in rows)
    lines += [
        "-" * (name_w + 60),
        f"total parameters: {total:,}",
        f"forward per {model.variant}x{model.variant} patch: {macs / 1e9:.1f} GMAC = "
        f"{2 * macs / 1e12:.3f} TFLOP (training step ~3x: {6 * macs / 1e12:.2f} TFLOP)",
        f"float32 weights: {total * 4 / 2**30:.2f} GiB; with grads and Adam moments: "
        f"{total * 16 / 2**30:.2f} GiB",
        f"activations kept for the backward pass: {stored_activation_bytes(model) / 2**30:.2f} GiB "
        f"per patch (remat={model.remat}, remat_heads={model.remat_heads})",
    ]
    return "\n".join(lines)
