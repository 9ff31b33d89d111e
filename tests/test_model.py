"""Micro-Net against the spec: parameter counts and shapes at full width (eval_shape, no weights),
and real forward/backward passes at reduced width on the CPU."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.config import base_config
from micronet_jax.models import build_model, resize_targets
from micronet_jax.models.micronet import named_mask_dropout
from micronet_jax.models.summary import (
    abstract_variables,
    count_params,
    forward_flops,
    stored_activation_bytes,
)


def make_model(**overrides):
    config = base_config()
    for key, value in overrides.items():
        setattr(config.model, key, value)
    return build_model(config.model)


def shapes_of(model, batch=2):
    variables = abstract_variables(model)
    x = jax.ShapeDtypeStruct((batch, model.variant, model.variant, 3), jnp.float32)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x
    )
    inter = {k: tuple(v[0].shape) for k, v in state["intermediates"].items()}
    return variables, out, inter


def test_resize_targets_follow_the_spec():
    assert resize_targets(508) == [256, 128, 64, 32]
    assert resize_targets(252) == [128, 64, 32, 16]


def test_micronet_508_full_width_matches_spec():
    variables, out, inter = shapes_of(make_model(variant=508))
    assert count_params(variables["params"]) == 457_038_472
    for name in ("main", "aux1", "aux2", "aux3"):
        assert out[name].shape == (2, 508, 508, 2)
        assert out[name].dtype == jnp.float32
    n = 2
    assert inter == {
        "B1_out": (n, 252, 252, 128), "B2_out": (n, 124, 124, 256), "B3_out": (n, 60, 60, 512),
        "B4_out": (n, 28, 28, 1024), "B5_out": (n, 8, 8, 2048), "B6_out": (n, 16, 16, 2048),
        "B7_out": (n, 32, 32, 1024), "B8_out": (n, 64, 64, 512), "B9_out": (n, 128, 128, 256),
        "B10_out": (n, 256, 256, 128), "FM1_out": (n, 510, 510, 64), "FM2_out": (n, 510, 510, 128),
        "FM3_out": (n, 510, 510, 256), "concat_out": (n, 510, 510, 448),
    }


def test_micronet_252_full_width_matches_spec():
    variables, out, inter = shapes_of(make_model(variant=252), batch=1)
    assert count_params(variables["params"]) == 184_396_424
    assert out["main"].shape == (1, 252, 252, 2)
    assert inter["B4_out"] == (1, 12, 12, 1024)
    assert inter["B5_out"] == (1, 8, 8, 2048)
    assert inter["B9_out"] == (1, 128, 128, 128)
    assert inter["concat_out"] == (1, 254, 254, 448)
    assert "B10_out" not in inter


def test_micronet_minus_drops_exactly_the_resized_input_branches():
    full = count_params(abstract_variables(make_model())["params"])
    minus = count_params(abstract_variables(make_model(multires=False))["params"])
    # Spec §6: removing conv3/conv4 of B1..B4 and halving the inputs of B2..B4 conv1, B5.conv1 and
    # the group-3 skip convTs gives 425,483,720.
    assert minus == 425_483_720
    branch = sum((9 * 3 * c + c) + (9 * c * c + c) for c in (64, 128, 256, 512))
    halved_inputs = 9 * (64 * 128 + 128 * 256 + 256 * 512 + 512 * 2048)  # B2..B5 conv1
    halved_skips = 25 * (512 * 1024 + 256 * 512 + 128 * 256 + 64 * 128)  # B7..B10 up3
    assert full - minus == branch + halved_inputs + halved_skips


def test_batch_norm_adds_tiatoolbox_parameter_count():
    variables = abstract_variables(make_model(batch_norm=True))
    assert count_params(variables["params"]) == 457_042_312
    assert "batch_stats" in variables


def test_forward_flops_match_spec():
    assert forward_flops(make_model()) == pytest.approx(1.337e12, rel=1e-3)
    assert forward_flops(make_model(variant=252)) == pytest.approx(0.2894e12, rel=1e-3)


@pytest.mark.parametrize("variant,size", [(508, 500), (508, 252), (252, 508)])
def test_wrong_input_size_points_to_tiling(variant, size):
    model = make_model(variant=variant, width=1 / 64)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with pytest.raises(ValueError, match=rf"only inputs of shape \(N, {variant}.*tiled"):
        jax.eval_shape(lambda k, x: model.init(k, x), jax.random.key(0), x)


def test_bad_config_values_name_the_key():
    for key, value in [("variant", 300), ("dtype", "float16"), ("dropout", 1.0), ("width", 0)]:
        with pytest.raises(ValueError, match=f"model.{key}"):
            make_model(**{key: value})


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = make_model(width=1 / 64, dtype="bfloat16")
    variables = abstract_variables(model)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    x = jax.ShapeDtypeStruct((1, 508, 508, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out["main"].dtype == jnp.float32


def test_width_multiplier_and_classes():
    model = make_model(width=1 / 16, num_classes=3)
    _, out, inter = shapes_of(model, batch=1)
    assert out["aux3"].shape == (1, 508, 508, 3)
    assert inter["B1_out"] == (1, 252, 252, 8)  # 2 x (64 / 16)
    assert inter["concat_out"] == (1, 510, 510, 28)  # (64 + 128 + 256) / 16


@pytest.fixture(scope="module")
def tiny():
    """A 1/32-width Micro-Net-508 with real weights: small enough for the CPU."""
    model = make_model(width=1 / 32, dtype="float32")
    x = jax.random.normal(jax.random.key(0), (1, 508, 508, 3))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    return model, params, x


def test_jitted_forward_equals_the_eager_one_and_repeats_exactly():
    """Users call the model both ways: jit(apply) must give the op-by-op result (XLA may fuse and
    reorder float math, hence a tolerance) and the same bits on every call."""
    model = make_model(width=1 / 64, dtype="float32")
    x = jax.random.normal(jax.random.key(0), (1, 508, 508, 3))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    with jax.disable_jit():
        eager = apply(params, x)
    jitted = jax.jit(apply)
    first, second = jitted(params, x), jitted(params, x)
    chex.assert_tree_all_finite(first)
    chex.assert_trees_all_close(first, eager, rtol=1e-4, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, first, second)
    # The heads differ from each other, so the comparison above covers four distinct outputs.
    assert not np.allclose(first["main"], first["aux1"])


class TestReducedWidthOnCpu:
    def test_forward_backward_is_finite(self, tiny):
        model, params, x = tiny
        labels = (x[..., 0] > 0).astype(jnp.int32)

        def loss_fn(params, rng):
            out = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
            total = 0.0
            for logits in out.values():
                logp = jax.nn.log_softmax(logits)
                total -= jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))
            return total

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, jax.random.key(3))
        assert np.isfinite(float(loss))
        chex.assert_tree_all_finite(grads)
        norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g)), grads)
        assert all(n > 0 for n in jax.tree.leaves(norms)), "every layer must receive gradient"
    def test_dropout_responds_to_train_mode(self, tiny):
        model, params, x = tiny
        apply = jax.jit(
            lambda p, x, k: model.apply({"params": p}, x, train=True, rngs={"dropout": k})
        )
        eval_apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
        a = apply(params, x, jax.random.key(0))
        b = apply(params, x, jax.random.key(1))
        e1, e2 = eval_apply(params, x), eval_apply(params, x)
        for name in ("main", "aux1", "aux2", "aux3"):
            assert not np.allclose(a[name], b[name]), f"{name}: dropout is off in train mode"
            np.testing.assert_array_equal(e1[name], e2[name])
            assert not np.allclose(a[name], e1[name])

    def test_remat_gives_the_same_gradients(self, tiny):
        model, params, x = tiny
        remat_model = make_model(width=1 / 32, dtype="float32", remat=True)

        def grads(m):
            f = lambda p: jnp.mean(m.apply({"params": p}, x)["main"] ** 2)  # noqa: E731
            return jax.jit(jax.grad(f))(params)

        chex.assert_trees_all_close(grads(model), grads(remat_model), rtol=1e-5, atol=1e-7)

    def test_rematerialisation_keeps_training_outputs_and_gradients(self, tiny):
        # With dropout on, the recomputed heads see the forward pass's masks (saved, or drawn again
        # from the same key), so outputs and gradients must match. The memory test below is what
        # shows the masks are saved rather than the dropped features.
        _, params, x = tiny
        key = jax.random.key(7)

        def outputs_and_grads(**remat):
            m = make_model(width=1 / 32, dtype="float32", **remat)

            def loss(p):
                out = m.apply({"params": p}, x, train=True, rngs={"dropout": key})
                return sum(jnp.mean(o ** 2) for o in out.values()), out

            return jax.jit(jax.grad(loss, has_aux=True))(params)

        reference = outputs_and_grads(remat=False, remat_heads=False)
        for remat in ({"remat": False, "remat_heads": True}, {"remat": True, "remat_heads": True}):
            # Fusion changes summation order (~4e-7 here); a different dropout mask would be O(0.1).
            chex.assert_trees_all_close(outputs_and_grads(**remat), reference, rtol=1e-4, atol=2e-6)

    def test_xla_and_fast_transposed_convs_agree_in_the_model(self, tiny):
        model, params, x = tiny
        xla_model = make_model(width=1 / 32, dtype="float32", transpose_impl="xla")
        fast = jax.jit(lambda p: model.apply({"params": p}, x))(params)
        slow = jax.jit(lambda p: xla_model.apply({"params": p}, x))(params)
        chex.assert_trees_all_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_head_dropout_follows_flax_semantics():
    x = jnp.full((4, 64, 64, 8), 3.0, jnp.bfloat16)
    y = np.asarray(named_mask_dropout(x, 0.5, jax.random.key(0)), np.float32)
    assert set(np.unique(y)) == {0.0, 6.0}  # kept values scaled by 1 / (1 - rate)
    assert abs((y > 0).mean() - 0.5) < 0.01
    assert named_mask_dropout(x, 0.5, jax.random.key(0)).dtype == jnp.bfloat16
    assert not np.any(np.asarray(named_mask_dropout(x, 1.0, jax.random.key(0)), np.float32))
    # Rate 0.5 unpacks 32 coins from each random word (70 channels: three words, the last partly
    # used): each element kept with probability 1/2, independently of its neighbours in channel,
    # space and batch, and a different mask for a different key.
    ones = jnp.ones((2, 96, 96, 70), jnp.float32)
    keep = np.asarray(named_mask_dropout(ones, 0.5, jax.random.key(1))) > 0
    assert abs(keep.mean() - 0.5) < 0.005
    assert abs(keep[..., 64:].mean() - 0.5) < 0.02  # the partly used last word
    for a, b in ((keep[..., 1:], keep[..., :-1]), (keep[:, 1:], keep[:, :-1]), (keep[1], keep[0])):
        assert abs(np.mean(a == b) - 0.5) < 0.01  # agreement of 0.5 = uncorrelated coins
    other = np.asarray(named_mask_dropout(ones, 0.5, jax.random.key(2))) > 0
    assert abs(np.mean(keep == other) - 0.5) < 0.01
    # Other rates go through jax.random.bernoulli.
    assert abs((np.asarray(named_mask_dropout(ones, 0.25, jax.random.key(1))) > 0).mean() - 0.75) < 0.005
    # dropout 0: train mode is the eval forward
    model = make_model(width=1 / 64, dtype="float32", dropout=0.0)
    xs = jax.random.normal(jax.random.key(1), (1, 508, 508, 3))
    params = jax.jit(model.init)(jax.random.key(2), xs)["params"]
    train = jax.jit(lambda p: model.apply({"params": p}, xs, train=True, rngs={"dropout": jax.random.key(3)}))
    chex.assert_trees_all_equal(train(params), jax.jit(lambda p: model.apply({"params": p}, xs))(params))


def test_rematerialisation_shrinks_the_stored_activations():
    """What autodiff keeps per patch (backend-independent): each remat switch must cut it."""
    stored = {
        (remat, heads): stored_activation_bytes(
            make_model(width=1 / 16, dtype="bfloat16", remat=remat, remat_heads=heads)
        )
        for remat in (False, True) for heads in (False, True)
    }
    # Ratios seen at this width: 0.66 / 0.55 / 0.53 on jax 0.10.2, 0.72 / 0.61 / 0.53 on jax 0.12.0.1.
    assert stored[False, True] < 0.8 * stored[False, False]
    assert stored[True, False] < 0.7 * stored[False, False]
    assert stored[True, True] < 0.6 * stored[True, False]


def test_full_width_stored_activations_per_patch():
    # Regression guard on the figure docs/benchmarks.md quotes (bf16, default switches): 1.46 GiB.
    gib = stored_activation_bytes(make_model(dtype="bfloat16")) / 2**30
    assert 1.3 < gib < 1.6, gib


def test_activation_and_batch_norm_switches_run():
    model = make_model(width=1 / 64, dtype="float32", activation="relu", batch_norm=True)
    x = jnp.ones((2, 508, 508, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    out, updates = jax.jit(
        lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)},
                              mutable=["batch_stats"])
    )(variables)
    assert math.isfinite(float(out["main"].sum()))
    assert "batch_stats" in updates


def _keys_cubic(x, a=-0.75):
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _torch_bicubic_matrix(n_in, n_out):
    """PyTorch's bicubic (a = -0.75, align_corners=False, edge indices clamped), as a matrix."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0 = int(np.floor(src))
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += _keys_cubic(src - x0 - k)
    return m


def test_resized_input_branch_is_pytorch_bicubic():
    """Spec §7.15: the B1..B4 resized inputs follow F.interpolate(mode='bicubic'), not Keys a=-0.5."""
    model = make_model(width=1 / 64, dtype="float32")
    x = jax.random.normal(jax.random.key(0), (1, 508, 508, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    captured = {}

    def record(next_fun, args, kwargs, context):
        if context.module.name == "conv3" and context.method_name == "__call__":
            captured[context.module.path[0]] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    import flax.linen as nn

    with nn.intercept_methods(record):
        model.apply(variables, x)
    for block, size in zip(("B1", "B2", "B3", "B4"), resize_targets(508)):
        m = _torch_bicubic_matrix(508, size)
        want = np.einsum("ih,hwc->iwc", m, np.asarray(x[0], np.float64))
        want = np.einsum("jw,iwc->ijc", m, want)
        np.testing.assert_allclose(captured[block][0], want, atol=2e-5)
