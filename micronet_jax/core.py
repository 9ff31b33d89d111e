"""The functional core that the trainer, the ablation runner and the benchmark all build on. No I/O.

* :class:`TrainState`: everything that changes during training, as one pytree;
* :func:`make_setup` (config) -> :class:`TrainSetup`: model, optimizer, schedule, the pure step
  ``(state, batch) -> (state, metrics)``, the initialiser ``seed -> state`` and the step counts;
* :func:`check_config`: the batch, class and crop rules, each failing with a message naming the keys;
* :func:`make_mesh`, the shardings and :func:`compile_train_step` (explicit shardings, donated state);
* :class:`Trainer`: those pieces on a 1-D ``data`` mesh, the trainer's and the benchmark's program;
* :func:`jit_tile_forward` / :func:`make_forward_fn`: the tile forward of tiled inference.

Layout: parameters and optimizer state are replicated; the batch is split on the mesh axis (``data``
for the trainer, ``seed`` for the ablation runner's vmapped seeds). Under ``jit`` the result does not
depend on the mesh size (jax_notes.md), so the same code runs on one CPU, 8 GPUs or a TPU pod slice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from micronet_jax import losses, optim
from micronet_jax.config import check_normalize, config_value, num_classes_for_target
from micronet_jax.models import MicroNet, build_model

StepFn = Callable[["TrainState", dict[str, jax.Array]], tuple["TrainState", dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (donated to the step)."""

    step: jax.Array  # int32 scalar: optimizer steps taken.
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} when BatchNorm is off).
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; each step's dropout key is fold_in(rng, step).
    # The moving average of :meth:`variables` (train.ema_decay > 0), or {} when there is none.
    ema: Any = dataclasses.field(default_factory=dict)

    def variables(self) -> dict[str, Any]:
        """The trained Flax variables; an empty BatchNorm collection is left out (orbax drops empty
        subtrees)."""
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v

    def inference_variables(self) -> dict[str, Any]:
        """The weights to validate, save for inference and export: the average when there is one."""
        return self.ema if self.ema else self.variables()


# ------------------------------------------------------------------------------------ config rules


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Fails early, naming the keys, when the batch cannot be split over devices and micro-batches,
    the classes do not match the target, or the crop is not the network's input size."""
    b, k = config.train.batch_size, config.train.grad_accum_steps
    d = num_devices if num_devices is not None else jax.device_count()
    if b < 1 or k < 1:
        raise ValueError(f"config train.batch_size={b} and train.grad_accum_steps={k} must be >= 1")
    if b % (k * d):
        cpu_hint = ""
        if config.get("cpu_devices") and jax.default_backend() == "cpu" and b % k == 0:
            cpu_hint = f", or fewer CPU devices (--config.cpu_devices={b // k})"
        raise ValueError(
            f"config train.batch_size={b} must be divisible by train.grad_accum_steps={k} times the "
            f"number of devices ({d}); e.g. use --config.train.batch_size={k * d * max(1, b // (k * d))}"
            f"{cpu_hint}"
        )
    want = num_classes_for_target(str(config.data.target))
    if int(config.model.num_classes) != want:
        raise ValueError(
            f"config model.num_classes={config.model.num_classes} does not match "
            f"data.target={config.data.target!r}, which needs {want} classes "
            f"(--config.model.num_classes={want})"
        )
    if config.data.crop_size != config.model.variant:
        raise ValueError(
            f"config data.crop_size={config.data.crop_size} must equal model.variant="
            f"{config.model.variant} (the network takes exactly that input size)"
        )
    check_normalize(str(config_value(config.data, "normalize", "data")))
    gap = int(config_value(config.data, "gap_width", "data"))
    if gap < 0:  # The training source would refuse it too, but only after the data has loaded.
        raise ValueError(f"config data.gap_width={gap} must be >= 0 (0 leaves the labels untouched)")
    decay = float(config_value(config.train, "ema_decay", "train"))
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"config train.ema_decay={decay} must be in [0, 1) (0 = no average)")
    check_eval_config(config.eval)


# eval.* keys and the least each may be (None where the key may be unset); thresholds are also <= 1.
_EVAL_MINIMA = {"threshold": 0.0, "marker_threshold": 0.0, "merge_threshold": 0.0, "opening_radius": 0,
                "min_size": 0, "border_min_size": 0, "min_marker_size": 0, "split_distance": 0.0,
                "split_threshold": 0.0,
                "marker_sigma": 0.0, "margin": 0, "tile_batch": 1, "tune_workers": 1}


def check_eval_config(eval_config: ml_collections.ConfigDict) -> None:
    """Fails before training, naming the key, on post-processing constants that validation would
    only refuse after the last step (a negative smoothing, a threshold above 1)."""
    for key, least in _EVAL_MINIMA.items():
        value = eval_config.get(key)
        if value is None:
            continue
        high = 1.0 if key.endswith("threshold") else None
        if value < least or (high is not None and value > high):
            span = f"in [{least}, {high}]" if high is not None else f">= {least}"
            raise ValueError(f"config eval.{key}={value} must be {span}")
    if float(eval_config.get("split_distance") or 0) > 0 and float(eval_config.get("split_threshold") or 0) > 0:
        raise ValueError(f"config eval.split_distance={eval_config.split_distance} and "
                         f"eval.split_threshold={eval_config.split_threshold}: choose one way to split "
                         "touching glands (set the other to 0)")


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    return max(1, int(config.train.patches_per_epoch) // int(config.train.batch_size))


def total_steps(config: ml_collections.ConfigDict) -> int:
    planned = steps_per_epoch(config) * int(config.train.epochs)
    if config.train.max_steps is not None:
        return min(planned, int(config.train.max_steps))
    return planned


def aux_steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Steps per epoch of the auxiliary weight: the training epoch unless ``train.aux_epochs`` is set."""
    return losses.aux_steps_per_epoch(config.train, steps_per_epoch(config), total_steps(config))


# ------------------------------------------------------------------------------------ the setup


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The pure pieces of one training configuration; nothing here is compiled or placed yet."""

    model: MicroNet
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    step_fn: StepFn
    init_fn: Callable[[Any], TrainState]  # seed (a Python int or a traced int32) -> initial state
    steps_per_epoch: int
    total_steps: int


def make_setup(config: ml_collections.ConfigDict) -> TrainSetup:
    """Model, optimizer, schedule, step and initialiser from ``config.model`` and ``config.train``."""
    model = build_model(config.model)
    spe, total = steps_per_epoch(config), total_steps(config)
    schedule = optim.learning_rate_schedule(config.train, spe, total)
    tx = optim.make_optimizer(config.train, schedule)
    ema_decay = float(config_value(config.train, "ema_decay", "train"))
    step_fn = make_train_step(
        model, tx, schedule, steps_per_epoch=aux_steps_per_epoch(config),
        aux_loss=bool(config.train.aux_loss), grad_accum_steps=int(config.train.grad_accum_steps),
        ema_decay=ema_decay,
    )
    return TrainSetup(model=model, tx=tx, schedule=schedule, step_fn=step_fn,
                      init_fn=functools.partial(initial_state, model, tx, ema=ema_decay > 0),
                      steps_per_epoch=spe, total_steps=total)


def initial_state(model: MicroNet, tx: optax.GradientTransformation, seed: Any,
                  ema: bool = False) -> TrainState:
    """The initial state for ``seed``; jit it with out_shardings so it is born sharded.

    ``seed`` may be traced: ``PRNGKey`` of a traced int gives the same key as of the constant, so one
    compiled initialiser serves every seed of an ablation sweep. With ``ema`` the moving average
    starts at the initial weights (after ~5/(1 - decay) steps they weigh less than 1%).
    """
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    x = jnp.zeros((1, model.variant, model.variant, 3), jnp.float32)
    variables = model.init(init_key, x, train=False)
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=dropout_key,
    )
    # A copy, not the same arrays: the state is donated to the step, leaf by leaf.
    return state.replace(ema=jax.tree.map(jnp.copy, state.variables())) if ema else state


def make_grad_fn(model: MicroNet) -> Callable:
    """``(params, batch_stats, batch, key, aux_scale) -> ((loss, (parts, batch_stats)), grads)``:
    weighted CE on the main and auxiliary outputs, its per-output parts and the pixel accuracy."""
    use_bn = model.batch_norm

    def loss_fn(params, batch_stats, batch, key, aux_scale):
        variables = {"params": params}
        if use_bn:
            variables["batch_stats"] = batch_stats
        outputs, updates = model.apply(
            variables, batch["image"], train=True, rngs={"dropout": key},
            mutable=["batch_stats"] if use_bn else [],
        )
        loss, parts = losses.micronet_loss(outputs, batch["label"], batch["weight"], aux_scale)
        pred = jnp.argmax(outputs["main"], axis=-1)
        parts["pixel_accuracy"] = jnp.mean((pred == batch["label"]).astype(jnp.float32))
        return loss, (parts, updates.get("batch_stats", batch_stats) if use_bn else batch_stats)

    return jax.value_and_grad(loss_fn, has_aux=True)


def accumulate_gradients(grad_fn: Callable, k: int) -> Callable:
    """``grad_fn`` over ``k`` micro-batches (one scan): mean loss, parts and gradient, the same result
    as the full batch with a k-th of its activation memory."""

    def accumulated(state, batch, key, aux_scale):
        # Micro-batch j takes rows j, j+k, ...: each device keeps its own rows (no reshuffle).
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch
        )

        def body(carry, inputs):
            grads_sum, loss_sum, parts_sum, batch_stats = carry
            j, mb = inputs
            (l, (p, batch_stats)), g = grad_fn(
                state.params, batch_stats, mb, jax.random.fold_in(key, j), aux_scale
            )
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
            return (add(grads_sum, g), loss_sum + l, add(parts_sum, p), batch_stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        names = [f"loss_{n}" for n in ("main", "aux1", "aux2", "aux3")] + ["pixel_accuracy"]
        parts0 = {n: jnp.zeros((), jnp.float32) for n in names}
        (grads, loss, parts, batch_stats), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), parts0, state.batch_stats),
            (jnp.arange(k), micro),
        )
        scale = lambda t: jax.tree.map(lambda v: v / k, t)  # noqa: E731
        return (scale(loss), (scale(parts), batch_stats)), scale(grads)

    return accumulated


def make_train_step(
    model: MicroNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    steps_per_epoch: int,
    aux_loss: bool,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
) -> StepFn:
    """The pure train step: weighted CE on main + aux outputs (aux weighted 1/epoch), then Adam.

    ``steps_per_epoch`` is the auxiliary weight's epoch (:func:`aux_steps_per_epoch`).

    With ``grad_accum_steps`` = k the batch is split into k micro-batches whose gradients are
    averaged before one optimizer update (same result as the full batch, for small GPUs).

    With ``ema_decay`` = d > 0 the state's ``ema`` becomes d * ema + (1 - d) * (the new weights)
    after each update; the update itself does not depend on it.
    """
    grad_fn = make_grad_fn(model)
    accumulated = accumulate_gradients(grad_fn, grad_accum_steps)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state.rng, state.step)
        aux_scale = losses.aux_weight(state.step, steps_per_epoch, aux_loss)
        if grad_accum_steps == 1:
            (loss, (parts, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, batch, key, aux_scale
            )
        else:
            (loss, (parts, batch_stats)), grads = accumulated(state, batch, key, aux_scale)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            **parts,
            "aux_weight": aux_scale,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        if ema_decay > 0:
            new_state = new_state.replace(ema=optax.incremental_update(
                new_state.variables(), state.ema, step_size=1.0 - ema_decay))
        return new_state, metrics

    return step


# --------------------------------------------------------------------------- mesh and shardings


def make_mesh(axis: str = "data", devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: all), with Auto axes (Explicit axes
    break the gradient of the cross-entropy, jax_notes.md)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


@functools.lru_cache(maxsize=None)
def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def split(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading axis split over the mesh's (only) axis: the batch, or the ablation's seed axis."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, sharding: Any = None) -> Any:
    """One sharding per leaf: replicated (pure data parallelism) unless ``sharding`` is given."""
    where = replicated(mesh) if sharding is None else sharding
    return jax.tree.map(lambda _: where, abstract_state)


def compile_train_step(
    step_fn: StepFn, state_sharding: Any, batch_sharding: Any, metrics_sharding: Any
) -> Callable:
    """jit with explicit shardings and the state donated (its buffers are reused for the new state)."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=0,
    )


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles this process's slice of the batch into one global, split array per key."""
    sharding = split(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attaches shardings to a pytree of ShapeDtypeStructs (a restore target)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class Trainer:
    """A :class:`TrainSetup` on a 1-D ``data`` mesh: the sharded initialiser and the compiled step."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None):
        check_config(config, len(devices) if devices is not None else None)
        self.config = config
        self.setup = make_setup(config)
        self.model = self.setup.model
        self.steps_per_epoch, self.total_steps = self.setup.steps_per_epoch, self.setup.total_steps
        self.mesh = make_mesh("data", devices)
        init = functools.partial(self.setup.init_fn, int(config.seed))
        self.abstract_state = jax.eval_shape(init)
        self.state_sharding = state_shardings(self.abstract_state, self.mesh)
        self._init = jax.jit(init, out_shardings=self.state_sharding)
        self.train_step = compile_train_step(
            self.setup.step_fn, self.state_sharding, split(self.mesh), replicated(self.mesh)
        )
        self._tile_forward = None

    def initial_state(self) -> TrainState:
        return self._init()

    def restore_target(self) -> TrainState:
        """The state's shapes, dtypes and shardings: what a checkpoint is restored into."""
        return with_shardings(self.abstract_state, self.state_sharding)

    def eval_forward(self, state: TrainState) -> Callable[[np.ndarray], np.ndarray]:
        """The tile forward for validation, compiled once per run and fed the current weights."""
        if self._tile_forward is None:
            self._tile_forward = jit_tile_forward(self.model)
        return make_forward_fn(self.model, state.inference_variables(), self._tile_forward)


# ------------------------------------------------------------------------------ the tile forward


def jit_tile_forward(model: MicroNet) -> Callable[[Any, jax.Array], jax.Array]:
    """The jitted tile forward (variables, tiles) -> main-head logits; the aux heads are training-only.

    Weights are an argument, not a closure constant, so one compiled program serves every
    checkpoint, every validation round of a run and every seed of an ablation sweep.
    """
    return jax.jit(lambda variables, tiles: model.apply(variables, tiles, train=False)["main"])


def make_forward_fn(
    model: MicroNet, variables: Any, compiled: Callable[[Any, jax.Array], jax.Array] | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """Binds weights to a tile forward (pass ``compiled`` from :func:`jit_tile_forward` to reuse it).

    With several local devices in a single process (GPUs, or ``config.cpu_devices``), every call whose
    tile count divides evenly is split over them, the weights replicated, as the training batch is;
    the jitted forward follows its inputs' shardings. Two CPU devices give 8.0 -> 9.2 tiles/s at width
    1/16 on the 2-core machine (issue #18). Otherwise (one device, several processes, an uneven batch)
    the tiles run on the default device as before.
    """
    forward = compiled or jit_tile_forward(model)
    devices = jax.local_devices()
    if len(devices) < 2 or jax.process_count() > 1:
        return lambda tiles: np.asarray(forward(variables, jnp.asarray(tiles, jnp.float32)))
    mesh = make_mesh("data", devices)
    variables = jax.device_put(variables, replicated(mesh))
    single = jax.sharding.SingleDeviceSharding(devices[0])
    on_one: list[Any] = []  # The weights on one device, copied only if an uneven batch comes.

    def run(tiles: np.ndarray) -> np.ndarray:
        tiles = np.asarray(tiles, np.float32)
        if tiles.shape[0] % len(devices) == 0:
            return np.asarray(forward(variables, jax.device_put(tiles, split(mesh))))
        if not on_one:
            on_one.append(jax.device_put(variables, single))
        return np.asarray(forward(on_one[0], jax.device_put(tiles, single)))

    return run
