"""Gradient accumulation is exact: k micro-batches give the same update as the whole batch.

``make_train_step`` splits the batch into k micro-batches (rows j, j+k, ... so every device keeps its
own rows), sums their gradients in a ``lax.scan`` and divides by k. Each micro-batch loss is a mean
over equally many pixels, so the mean of the k micro-batch gradients is the full-batch gradient and
one optimizer step must land on the same parameters. Dropout is off (its masks are drawn per
micro-batch, so they legitimately differ) and BatchNorm is off by default.

Adam's first update is close to ``lr * sign(g)``, which would hide a wrong gradient *scale* (say, a
missing ``/ k``), so the gradient norm and the losses are compared as well as the parameters.

Cost: two train-step compiles at width 1/64. The k=1 step is the same program, on the same config,
that ``tests/test_benchmark.py`` compiles, so with the session's persistent compilation cache
(conftest.py) only the k=2 program is new.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from micronet_jax import benchmark
from micronet_jax.config import load_config_file
from micronet_jax.core import Trainer

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")
BATCH = 4


def small_config(grad_accum_steps: int):
    """configs/default.py at width 1/64, fp32, no dropout, batch 4 (same as test_benchmark's run)."""
    c = load_config_file(CONFIG)
    c.model.width = 1 / 64
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    c.model.remat = False
    c.train.batch_size = BATCH
    c.train.grad_accum_steps = grad_accum_steps
    return c


def one_step(grad_accum_steps: int):
    """Params before, params after and the metrics of one step from a fixed synthetic state and batch."""
    trainer = Trainer(small_config(grad_accum_steps))
    state = benchmark.synthetic_state(trainer, seed=0)
    batch = benchmark.synthetic_batch(trainer, BATCH, seed=0)
    before = jax.device_get(state.params)  # The step donates the state, so copy it first.
    state, metrics = trainer.train_step(state, batch)
    return before, jax.device_get(state.params), jax.device_get(metrics), int(state.step)


@pytest.mark.slow
def test_two_micro_batches_equal_one_full_batch():
    before1, after1, m1, step1 = one_step(1)
    before2, after2, m2, step2 = one_step(2)
    assert step1 == step2 == 1

    # Same starting point, so any difference below comes from the step.
    jax.tree.map(np.testing.assert_array_equal, before1, before2)
    assert bool(m1["finite"]) and bool(m2["finite"])

    # The step moved every layer's weights by far more than the tolerance below (Adam's first step
    # moves most weights by about lr = 1e-3), or equal params would prove nothing.
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after1, before1)
    assert min(jax.tree.leaves(moved)) > 100 * 2e-6, moved

    # Gradient scale and losses: what Adam's first step would hide.
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for key in ("loss", "loss_main", "loss_aux1", "loss_aux2", "loss_aux3", "pixel_accuracy"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(m2["update_norm"], m1["update_norm"], rtol=1e-4)

    # Parameters after one step: equal to well below the size of one update (~1e-3 per weight).
    def close(path, a, b):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-6, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(close, after1, after2)
