"""Training: a jitted, sharded step over a device mesh, and the loop around it.

The functional core is :func:`make_train_step` (state, batch) -> (state, metrics), a pure function
that ``jax.jit`` compiles once with explicit shardings and a donated state. Everything with side
effects (data, checkpoints, logs, validation, progress) lives in :func:`train_and_evaluate`.

Layout: a 1-D mesh over every device of every process, axis ``data``. Parameters and optimizer
state are replicated; the batch is split on ``data``. The same code runs on one CPU, 8 GPUs or a TPU
pod slice: under ``jit`` the result does not depend on the mesh size (jax_notes.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from micronet_jax import checkpointing, losses, preemption
from micronet_jax import workdir as workdir_lib
from micronet_jax.evaluate import format_hausdorff, json_scalar
from micronet_jax.models import MicroNet, build_model

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (donated to the step)."""

    step: jax.Array  # int32 scalar: optimizer steps taken.
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} when BatchNorm is off).
    opt_state: Any
    rng: jax.Array  # uint32[2] base key; each step's dropout key is fold_in(rng, step).

    def variables(self) -> dict[str, Any]:
        """Flax variables; an empty BatchNorm collection is left out (orbax drops empty subtrees)."""
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


# ------------------------------------------------------------------------------------------ devices


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Starts JAX's multi-host runtime when configured (must precede any other JAX call).

    With no coordinator given, ``jax.distributed.initialize()`` auto-detects Cloud TPU and SLURM.
    """
    d = config.distributed
    if not d.initialize:
        return
    kwargs = {}
    if d.coordinator_address:
        kwargs = dict(
            coordinator_address=d.coordinator_address,
            num_processes=d.num_processes,
            process_id=d.process_id,
        )
    if (config.platform or os.environ.get("JAX_PLATFORMS", "")) == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh, over all devices unless given, with Auto axes (Explicit axes break
    the gradient of the cross-entropy, jax_notes.md)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def check_batch(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Fails early, naming the keys, when the batch cannot be split over devices and micro-batches."""
    b, k = config.train.batch_size, config.train.grad_accum_steps
    d = num_devices if num_devices is not None else jax.device_count()
    if b < 1 or k < 1:
        raise ValueError(f"config train.batch_size={b} and train.grad_accum_steps={k} must be >= 1")
    if b % (k * d):
        raise ValueError(
            f"config train.batch_size={b} must be divisible by train.grad_accum_steps={k} times the "
            f"number of devices ({d}); e.g. use --config.train.batch_size={k * d * max(1, b // (k * d))}"
        )
    from micronet_jax.data.targets import num_classes

    want = num_classes(str(config.data.target))
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


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    return max(1, int(config.train.patches_per_epoch) // int(config.train.batch_size))


def aux_steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Steps per epoch of the auxiliary weight: the training epoch unless ``train.aux_epochs`` is set."""
    return losses.aux_steps_per_epoch(config.train, steps_per_epoch(config), total_steps(config))


def total_steps(config: ml_collections.ConfigDict) -> int:
    planned = steps_per_epoch(config) * int(config.train.epochs)
    if config.train.max_steps is not None:
        return min(planned, int(config.train.max_steps))
    return planned


# ------------------------------------------------------------------------------------ pure core


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = losses.learning_rate_schedule(config.train, steps_per_epoch(config), total_steps(config))
    return losses.make_optimizer(config.train, schedule), schedule


def init_state(
    model: MicroNet, tx: optax.GradientTransformation, seed: int
) -> Callable[[], TrainState]:
    """A function building the initial state; jit it with out_shardings so it is born sharded."""

    def init() -> TrainState:
        key = jax.random.PRNGKey(seed)
        init_key, dropout_key = jax.random.split(key)
        x = jnp.zeros((1, model.variant, model.variant, 3), jnp.float32)
        variables = model.init(init_key, x, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=dropout_key,
        )

    return init


def make_train_step(
    model: MicroNet,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    steps_per_epoch: int,
    aux_loss: bool,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step: weighted CE on main + aux outputs (aux weighted 1/epoch), then Adam.

    ``steps_per_epoch`` is the auxiliary weight's epoch (:func:`aux_steps_per_epoch`).

    With ``grad_accum_steps`` = k the batch is split into k micro-batches whose gradients are
    averaged before one optimizer update (same result as the full batch, for small GPUs).
    """
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

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(state.rng, state.step)
        aux_scale = losses.aux_weight(state.step, steps_per_epoch, aux_loss)
        if grad_accum_steps == 1:
            (loss, (parts, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, batch, key, aux_scale
            )
        else:
            k = grad_accum_steps
            # Micro-batch j takes rows j, j+k, ...: each device keeps its own rows (no reshuffle).
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), batch
            )

            def accumulate(carry, inputs):
                grads_sum, loss_sum, parts_sum, batch_stats = carry
                j, mb = inputs
                (l, (p, batch_stats)), g = grad_fn(
                    state.params, batch_stats, mb, jax.random.fold_in(key, j), aux_scale
                )
                add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
                return (add(grads_sum, g), loss_sum + l, add(parts_sum, p), batch_stats), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            parts0 = {f"loss_{n}": 0.0 for n in ("main", "aux1", "aux2", "aux3")}
            parts0["pixel_accuracy"] = 0.0
            parts0 = jax.tree.map(lambda v: jnp.zeros((), jnp.float32), parts0)
            (grads, loss, parts, batch_stats), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), parts0, state.batch_stats),
                (jnp.arange(k), micro),
            )
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = loss / k
            parts = jax.tree.map(lambda v: v / k, parts)

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
        return new_state, metrics

    return step


@functools.lru_cache(maxsize=None)
def _replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Replicated parameters and optimizer state (pure data parallelism)."""
    return jax.tree.map(lambda _: _replicated(mesh), abstract_state)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def compile_train_step(
    step_fn: Callable, state_sharding: TrainState, mesh: jax.sharding.Mesh
) -> Callable:
    """jit with explicit shardings and the state donated (its buffers are reused for the new state)."""
    data = batch_sharding(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, data),
        out_shardings=(state_sharding, _replicated(mesh)),
        donate_argnums=0,
    )


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles this process's slice of the batch into one global, data-sharded array per key."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


# ---------------------------------------------------------------------------------------- loop


class Trainer:
    """Holds what the loop needs: model, optimizer, mesh, compiled step and the abstract state."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None):
        check_batch(config, len(devices) if devices is not None else None)
        self.config = config
        self.model = build_model(config.model)
        self.tx, self.schedule = make_optimizer(config)
        self.mesh = make_mesh(devices)
        self.steps_per_epoch = steps_per_epoch(config)
        self.total_steps = total_steps(config)
        init = init_state(self.model, self.tx, int(config.seed))
        self.abstract_state = jax.eval_shape(init)
        self.state_sharding = state_shardings(self.abstract_state, self.mesh)
        self._init = jax.jit(init, out_shardings=self.state_sharding)
        step_fn = make_train_step(
            self.model, self.tx, self.schedule,
            steps_per_epoch=aux_steps_per_epoch(config),
            aux_loss=bool(config.train.aux_loss),
            grad_accum_steps=int(config.train.grad_accum_steps),
        )
        self.train_step = compile_train_step(step_fn, self.state_sharding, self.mesh)
        self._tile_forward = None

    def initial_state(self) -> TrainState:
        return self._init()

    def abstract_targets(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore targets (shape, dtype, sharding) for the two checkpoint items."""
        s = checkpointing.with_shardings(self.abstract_state, self.state_sharding)
        return s.variables(), {"opt_state": s.opt_state, "step": s.step, "rng": s.rng}

    def state_from_items(self, variables: dict[str, Any], opt: dict[str, Any]) -> TrainState:
        return TrainState(
            step=opt["step"], params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=opt["opt_state"], rng=opt["rng"],
        )

    def eval_forward(self, state: TrainState) -> Callable[[np.ndarray], np.ndarray]:
        """The tile forward for validation, compiled once per run and fed the current weights."""
        from micronet_jax.evaluate import jit_tile_forward, make_forward_fn

        if self._tile_forward is None:
            self._tile_forward = jit_tile_forward(self.model)
        return make_forward_fn(self.model, state.variables(), self._tile_forward)


class MetricWriter:
    """metrics.jsonl plus TensorBoard scalars and images, written by process 0 only."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_records_after(path, resume_step)
        self._jsonl = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # The GPU image may lack tensorboardX; jsonl still has everything.
            logger.warning("tensorboardX is not installed: no TensorBoard events are written")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{f"{prefix}{k}": json_scalar(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                v = json_scalar(v)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}{k}", v, int(step))

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        if self.enabled and self._tb is not None:
            for name, img in images.items():
                self._tb.add_image(name, img, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
    """On resume, forgets what a killed run logged after its last checkpoint: those steps are
    trained (and logged) again, and the log should read like one uninterrupted run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf; the last good checkpoint is left untouched."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds checkpoints), validates, and writes reports.

    Returns the final validation summary (GlaS metrics), the last step, whether the run finished,
    and what stopped it early (``stopped_by``: ``"time limit"`` for ``train.time_limit_seconds``,
    ``"SIGTERM"`` / ``"SIGINT"`` for a signal; None when it finished). An early stop always leaves a
    checkpoint of the step it stopped at, so rerunning the same command resumes there.

    Before anything in the workdir changes, the run takes the workdir's lock (one run per workdir,
    process 0 in multi-host runs) and, when resuming, compares the saved config with ``config``
    (:func:`micronet_jax.workdir.resume_changes`): a changed model or optimizer is refused.
    """
    maybe_initialize_distributed(config)
    workdir = workdir_lib.check_path(workdir)
    with contextlib.ExitStack() as guards:
        _lock_workdir(workdir, guards)
        stop = guards.enter_context(preemption.StopRequest())
        return _train(config, workdir, stop)


def _lock_workdir(workdir: str, guards: contextlib.ExitStack) -> None:
    """Process 0 takes the lock; the others learn whether it could (one collective at start-up), so a
    refused multi-host run stops on every process instead of waiting for process 0 forever."""
    error: Exception | None = None
    if jax.process_index() == 0:
        try:
            guards.enter_context(workdir_lib.WorkdirLock(workdir))
        except workdir_lib.WorkdirInUseError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and error is None:
            error = workdir_lib.WorkdirInUseError(f"workdir {workdir} is in use by another run "
                                                  "(see the message of process 0)")
    if error is not None:
        raise error


def _check_resume_config(config: ml_collections.ConfigDict, workdir: str, ckpt_dir: str) -> None:
    """Refuses a resume whose model or optimizer differs from the saved run; logs other changes."""
    saved = None
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        for step in checkpointing.step_folders(ckpt_dir):  # config.json lost: ask the checkpoints.
            try:
                saved = checkpointing.read_config(ckpt_dir, step)
                break
            except Exception:  # noqa: BLE001 - damaged; the restore below names it.
                continue
    if saved is None:
        logger.warning("no readable saved config in %s: resuming without comparing configs", workdir)
        return
    refused, allowed = workdir_lib.resume_changes(saved, json.loads(config.to_json_best_effort()))
    if refused:
        raise ValueError(
            f"cannot resume {workdir}: it was trained with a different model or optimizer ("
            + "; ".join(refused)
            + f"). Resume with the saved values (they are in {os.path.join(workdir, 'config.json')}) "
            "or train into a new --workdir. The checkpoints were not touched."
        )
    if allowed:
        logger.info("resuming %s with changed config keys: %s", workdir, "; ".join(allowed))


def _restore_or_init(trainer: Trainer, ckpt_dir: str, data_iter: Any, workdir: str) -> TrainState:
    """The newest readable checkpoint's state (damaged newer folders are moved aside), else a fresh one."""
    variables_t, opt_t = trainer.abstract_targets()

    def restore(step: int):
        return checkpointing.restore_training(
            ckpt_dir, step, abstract_variables=variables_t, abstract_opt=opt_t, data_iter=data_iter
        )

    step, restored, damaged = checkpointing.restore_newest_readable(ckpt_dir, restore)
    for bad, why in damaged:
        # Out of orbax's way (it would refuse to open the folder or to save that step again), kept.
        where = checkpointing.set_aside(ckpt_dir, bad) if jax.process_index() == 0 else "(process 0)"
        logger.warning("checkpoint folder %s cannot be read (%s): moved it to %s (nothing is deleted) "
                       "and resumed from step %d instead", os.path.join(ckpt_dir, str(bad)), why,
                       where, step)
    if damaged and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("damaged checkpoints set aside")
    if step is None:
        return trainer.initial_state()
    logger.info("resumed from step %d in %s", step, workdir)
    return trainer.state_from_items(*restored)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: preemption.StopRequest) -> dict[str, Any]:
    from micronet_jax.data import load_split
    from micronet_jax.data.pipeline import TrainSource, make_train_dataset

    is_main = jax.process_index() == 0
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if checkpointing.step_folders(ckpt_dir):
        _check_resume_config(config, workdir, ckpt_dir)
    trainer = Trainer(config)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logger.info(
        "devices: %d (%s) in %d process(es); global batch %d, per process %d, per device %d; "
        "%d steps of %d per epoch",
        jax.device_count(), jax.devices()[0].platform, jax.process_count(),
        config.train.batch_size, config.train.batch_size // jax.process_count(),
        config.train.batch_size // jax.device_count(), trainer.total_steps, trainer.steps_per_epoch,
    )

    # Data: every process builds the same source and reads its own disjoint slice of each batch.
    train_examples = load_split(config.data, "train")
    val_examples = _validation_examples(config)
    source = TrainSource.from_config(train_examples, config.data)
    dataset = make_train_dataset(
        source, config.data, global_batch_size=int(config.train.batch_size),
        seed=int(config.seed), process_index=jax.process_index(),
        process_count=jax.process_count(), crop_size=int(config.data.crop_size),
    )
    data_iter = iter(dataset)
    manager = None
    try:
        state = _restore_or_init(trainer, ckpt_dir, data_iter, workdir)
        manager = checkpointing.make_manager(ckpt_dir, keep=int(config.train.keep_checkpoints))
        return _loop(config, workdir, trainer, state, data_iter, val_examples, manager, stop)
    finally:
        if manager is not None:
            # Orbax's writer threads end here, before any error reaches the user as one line.
            manager.wait_until_finished()
            manager.close()
        close = getattr(data_iter, "close", None)
        if close is not None:  # Stops grain's worker processes and prefetch threads.
            close()


def _loop(
    config: ml_collections.ConfigDict,
    workdir: str,
    trainer: Trainer,
    state: TrainState,
    data_iter: Any,
    val_examples: list[Any],
    manager: Any,
    stop: preemption.StopRequest,
) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    start_step = int(state.step)
    writer = MetricWriter(workdir, resume_step=start_step)
    val_f1: float | None = None
    validated_at = -1
    last_summary: dict[str, Any] | None = None
    pending: tuple[int, dict[str, jax.Array]] | None = None
    bar = tqdm(
        total=trainer.total_steps, initial=start_step, desc="train", unit="step",
        disable=not is_main, dynamic_ncols=True,
    )
    window_start, window_steps = time.perf_counter(), 0

    def check(step_metrics: tuple[int, dict[str, jax.Array]]) -> dict[str, float]:
        """Fetches a finished step's metrics and stops the run on a non-finite loss."""
        s, m = step_metrics
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if not host.pop("finite"):
            last = manager.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss at step {s} (loss={host['loss']}, grad_norm={host['grad_norm']}). "
                f"Training stopped; the last good checkpoint (step {last}) is kept in {workdir}. "
                "Try a lower --config.train.learning_rate or --config.train.grad_clip_norm."
            )
        return host

    def report(step_metrics: tuple[int, dict[str, jax.Array]], force: bool = False) -> None:
        """Checks a finished step and, every log_every steps (and the first and last), logs it."""
        nonlocal window_start, window_steps
        host = check(step_metrics)
        s = step_metrics[0]
        if force or s % config.train.log_every == 0 or s == start_step + 1:
            elapsed = time.perf_counter() - window_start
            rate = window_steps * config.train.batch_size / max(elapsed, 1e-9)
            host["patches_per_second"] = rate
            writer.scalars(s, host, prefix="train/")
            bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{host['learning_rate']:.2e}",
                            patches_s=f"{rate:.1f}")
            window_start, window_steps = time.perf_counter(), 0

    def save(step: int) -> None:
        checkpointing.save(
            manager, step,
            variables=state.variables(),
            opt={"opt_state": state.opt_state, "step": state.step, "rng": state.rng},
            data_iter=data_iter, config=config, val_f1=val_f1 if validated_at == step else None,
        )

    def stop_here(done: int, reason: str) -> None:
        """An early stop: the step just taken is checked and checkpointed before the loop ends."""
        check(pending)
        if manager.latest_step() != done:
            save(done)
        manager.wait_until_finished()
        if reason == "time limit":
            logger.info("time limit of %.0f s reached at step %d of %d: checkpoint saved; run the "
                        "same command again to resume", time_limit, done, trainer.total_steps)
        else:
            logger.info("%s: checkpoint of step %d of %d saved", reason, done, trainer.total_steps)

    time_limit = config.train.time_limit_seconds
    loop_start, stopped_by = time.perf_counter(), None
    try:
        for step in range(start_step, trainer.total_steps):
            # While step N-1 still runs on the device, the host takes the next batch from grain's
            # workers and starts its (asynchronous) copy to the device: the device never waits for
            # the host as long as that takes less than a step.
            batch = global_batch(next(data_iter), trainer.mesh)
            state, metrics = trainer.train_step(state, batch)
            # Check the previous step while this one runs: no host sync on the hot path.
            if pending is not None:
                report(pending)
            pending = (step + 1, metrics)
            window_steps += 1
            bar.update(1)
            done = step + 1
            eval_now = config.train.eval_every and done % config.train.eval_every == 0
            # A validated step is always saved, so BestN can keep the best one by object F1.
            save_now = (
                done % config.train.checkpoint_every == 0 or done == trainer.total_steps or eval_now
            )
            if (eval_now or save_now) and pending is not None:
                check(pending)  # Never checkpoint or validate weights that came from a NaN step.
            if eval_now and val_examples:
                # On the last step this is the final validation: it also writes the reports.
                last_summary = _validate(trainer, state, val_examples, config, writer, done, workdir,
                                         final=done == trainer.total_steps)
                val_f1, validated_at = last_summary["f1"], done
            if save_now and not (done == trainer.total_steps and val_examples):
                save(done)
            # Asked every step: in multi-process runs it is JAX's preemption sync point.
            signalled = stop.should_stop(done)
            if done < trainer.total_steps:
                if signalled:
                    stopped_by = stop.name
                elif time_limit and time.perf_counter() - loop_start > time_limit:
                    stopped_by = "time limit"
                if stopped_by:
                    stop_here(done, stopped_by)
                    break
        if pending is not None:
            report(pending, force=True)
        bar.close()
        end_step = int(state.step)
        if stopped_by is None and stop.signum is not None and val_examples and validated_at != end_step:
            # Signalled during the last step: keep it, and leave the final validation to the rerun
            # (a finished run's rerun re-validates), which may take minutes on whole images.
            stopped_by = stop.name
            stop_here(end_step, stopped_by)
        if stopped_by:
            return {"summary": last_summary, "step": end_step, "finished": False,
                    "stopped_by": stopped_by}
        if val_examples and validated_at != end_step:
            last_summary = _validate(trainer, state, val_examples, config, writer, end_step, workdir,
                                     final=True)
            val_f1, validated_at = last_summary["f1"], end_step
        if manager.latest_step() != end_step:
            save(end_step)
        manager.wait_until_finished()
        if is_main and val_examples:
            _write_training_plot(workdir)
    finally:
        bar.close()
        writer.close()
    return {"summary": last_summary, "step": int(state.step), "finished": True, "stopped_by": None}


def _validation_examples(config: ml_collections.ConfigDict) -> list[Any]:
    from micronet_jax.data import load_split

    if config.data.source != "synthetic" and not config.data.val_fraction:
        return []
    examples = load_split(config.data, "val")
    if config.eval.max_images:
        examples = examples[: int(config.eval.max_images)]
    return examples


def _validate(
    trainer: Trainer,
    state: TrainState,
    examples: list[Any],
    config: ml_collections.ConfigDict,
    writer: MetricWriter,
    step: int,
    workdir: str,
    final: bool = False,
) -> dict[str, Any]:
    """Whole-image tiled validation with the GlaS metrics; the final one also writes reports."""
    from micronet_jax import evaluate, visualize

    out = os.path.join(workdir, "eval_val") if final else None
    result = evaluate.evaluate_examples(
        trainer.eval_forward(state), examples, config.eval, trainer.model.variant,
        # Every process validates (same weights, same result); only process 0 writes files.
        overlay_dir=os.path.join(out, "overlays") if out and jax.process_index() == 0 else None,
        progress=jax.process_index() == 0, scale=float(config.data.scale),
    )
    s = result["summary"]
    writer.scalars(step, {k: s[k] for k in ("f1", "object_dice", "object_hausdorff", "pixel_dice",
                                            "precision", "recall")}, prefix="val/")
    if config.train.image_summary_every or final:
        ex = examples[0]
        writer.images(step, {
            "val/overlay": visualize.overlay_outlines(ex.image, result["predictions"][0], ex.label),
            "val/prediction": visualize.colorize_labels(result["predictions"][0]),
            "val/ground_truth": visualize.colorize_labels(ex.label),
            "val/input": ex.image,
        })
    logger.info("step %d validation: F1 %.4f, object Dice %.4f, object Hausdorff %s, pixel Dice %.4f",
                step, s["f1"], s["object_dice"], format_hausdorff(s["object_hausdorff"]), s["pixel_dice"])
    if out and jax.process_index() == 0:
        evaluate.write_report(out, "val", result, {"step": step, "workdir": workdir})
    return s


def _write_training_plot(workdir: str) -> None:
    """training_curves.png from metrics.jsonl (loss and validation F1 against step)."""
    try:
        from micronet_jax.plots import plot_training_curves
    except ImportError:  # matplotlib is optional on accelerator images; metrics.jsonl has the data.
        logger.warning("matplotlib is not installed: training_curves.png is not written")
        return
    plot_training_curves(os.path.join(workdir, "metrics.jsonl"),
                         os.path.join(workdir, "training_curves.png"))
