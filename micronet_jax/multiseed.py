"""Several seeds of one config trained together: ``jit(vmap(step))`` over a leading ``seed`` axis.

The step of :func:`micronet_jax.core.make_setup` is pure, so vmapping it over a stacked state and a
stacked batch (split over a ``seed`` mesh of the local devices when the seeds divide evenly over
them, each device running its own seeds: :func:`seeds_per_device`) trains S independent models in
one program: each seed keeps its own initialisation and its
own data stream; only the compiled code is shared. ``tests/test_ablation.py`` checks that this
equals training each seed alone. The ablation runner (``micronet_jax.ablation``) builds on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from micronet_jax import core, reporting

logger = logging.getLogger(__name__)


def fingerprint(config: ml_collections.ConfigDict, drop: Sequence[str] = ()) -> str:
    """A short hash of the config (minus the ``drop`` sections), to refuse mixing results of
    different settings in one workdir."""
    d = config.to_dict()
    for k in drop:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ pure pieces


def unstack_tree(tree: Any, index: int) -> Any:
    """The ``index``-th slice of a stacked pytree (one seed's state)."""
    return jax.tree.map(lambda x: x[index], tree)


@jax.jit
def _stack(states: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def init_seed_states(init_fn: Any, seeds: Sequence[int], stack: bool = True) -> Any:
    """Initial TrainStates for ``seeds`` from a jitted ``setup.init_fn``: stacked or a list.

    Each seed is initialised alone and the states are stacked afterwards: a vmapped ``model.init``
    compiled ~2x slower on CPU, while one jitted init with a traced seed serves every seed.
    """
    states = [init_fn(jnp.asarray(s, jnp.int32)) for s in seeds]
    return _stack(states) if stack else states


def seed_mesh(num_seeds: int) -> jax.sharding.Mesh:
    """A ``seed`` mesh over the local devices when the seeds divide evenly over them, else over one."""
    devices = jax.local_devices()
    return core.make_mesh("seed", devices if num_seeds % len(devices) == 0 else devices[:1])


def seeds_per_device(step_fn: Any, mesh: jax.sharding.Mesh) -> Any:
    """``vmap(step_fn)`` run by each device of the ``seed`` mesh on its own seeds: a ``shard_map``.

    Why not let jit partition ``vmap(step_fn)`` over the seed axis: the seeds never communicate, and
    XLA's partitioner got that program wrong. Vmapped over seeds, a convolution has one kernel per
    seed (a grouped convolution); split over 2 CPU devices (jax 0.10.2), every 1x1 one (the fuse
    convs of the up blocks, the heads) gathered all seeds' channels and returned other seeds'
    features, so a 2-device sweep trained different models from its seeds trained alone. Under
    ``shard_map`` nothing is partitioned: each device runs the one-device program on its slice.
    ``tests/test_ablation.py`` checks both layouts against seeds trained alone.
    """
    spec = jax.sharding.PartitionSpec(mesh.axis_names[0])
    return jax.shard_map(jax.vmap(step_fn), mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))


# ------------------------------------------------------------------------------ training


@dataclasses.dataclass
class TrainRecord:
    """What one seed's training produced (written as train.json beside the checkpoint)."""

    variant: str
    seed: int
    steps: int
    train_seconds: float
    compile_seconds: float
    final_train_loss: float
    finite: bool
    trained_with: str
    train_fingerprint: str
    losses: list[float]


_SOURCE_CACHE: dict[str, Any] = {}


def _train_source(config: ml_collections.ConfigDict) -> Any:
    """The training images with weight maps, shared by every variant with the same data settings.

    Weight maps cost ~2 s on GlaS; variants differing only in model/optimizer need not redo them.
    """
    from micronet_jax.data.pipeline import TrainSource

    d = config.data.to_dict()
    for k in ("augment", "num_workers", "crop_size"):
        d.pop(k, None)
    key = json.dumps(d, sort_keys=True, default=str)
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()  # Keep at most one source alive (GlaS: hundreds of MB).
        _SOURCE_CACHE[key] = TrainSource.for_training(config.data)
    return _SOURCE_CACHE[key]


class Programs:
    """The setup, its jitted init and the compiled steps for one (model, optimizer) configuration.

    Variants that differ only in data settings (no_weight_map, no_augment, stain_jitter) train the
    very same program as the baseline; caching it by the config sections the step closes over saves
    one 20-40 s CPU compile (minutes at full width) per such variant.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.setup = core.make_setup(config)
        self.init = jax.jit(self.setup.init_fn)
        self._compiled: dict[tuple, Any] = {}

    def compiled_step(self, state: Any, batch: Any, mesh: jax.sharding.Mesh,
                      vmap_seeds: bool) -> tuple[Any, float]:
        """The step compiled ahead of time for these shapes, and the seconds compiling took (0 if cached).

        Vmapped, state, batch and metrics are split on the ``seed`` axis; alone, everything is
        replicated on a one-device mesh.
        """
        key = (vmap_seeds, str(jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)),
                                            (state, batch))))
        if key in self._compiled:
            return self._compiled[key], 0.0
        where = core.split(mesh) if vmap_seeds else core.replicated(mesh)
        step = core.compile_train_step(
            seeds_per_device(self.setup.step_fn, mesh) if vmap_seeds else self.setup.step_fn,
            core.state_shardings(state, mesh, where), where, where)
        t0 = time.perf_counter()
        self._compiled[key] = step.lower(state, batch).compile()
        return self._compiled[key], time.perf_counter() - t0


_PROGRAMS: dict[str, Programs] = {}


def programs_for(config: ml_collections.ConfigDict) -> Programs:
    """Cached :class:`Programs` keyed by everything the step depends on: model and train sections."""
    key = json.dumps({"model": config.model.to_dict(), "train": config.train.to_dict()},
                     sort_keys=True, default=str)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = Programs(config)
    return _PROGRAMS[key]


def train_seeds(config: ml_collections.ConfigDict, seeds: Sequence[int], *, variant: str = "",
                vmap_seeds: bool = True) -> tuple[list[Any], list[TrainRecord]]:
    """Trains ``config`` once per seed; returns each seed's final weights
    (``{"params"[, "batch_stats"]}``, the moving average with ``train.ema_decay``) and record.

    With ``vmap_seeds`` the seeds run as one ``jit(vmap(step))`` program; otherwise one after another
    with the plain jitted step (same results, less memory). ``config.seed`` is ignored: each run's seed
    fixes both its initialisation and its data stream.
    """
    core.check_config(config, num_devices=1)  # The batch is not split: devices take seeds.
    programs = programs_for(config)
    groups = [list(seeds)] if vmap_seeds else [[s] for s in seeds]
    variables_out: list[Any] = []
    records: list[TrainRecord] = []
    fp = fingerprint(config, drop=("eval", "seed"))
    for group in groups:
        state, history, seconds = _train_group(config, programs, group, variant, vmap_seeds)
        label = f"vmap x{len(group)}" if vmap_seeds else "sequential"
        for j, seed in enumerate(group):
            pick = (lambda x, j=j: x[j]) if vmap_seeds else (lambda x: x)
            losses = [float(pick(h["loss"])) for h in history]
            one = unstack_tree(state, j) if vmap_seeds else state
            variables_out.append(jax.device_get(one.inference_variables()))
            tail = losses[-reporting.FINAL_LOSS_WINDOW:]
            records.append(TrainRecord(
                variant=variant, seed=int(seed), steps=programs.setup.total_steps,
                train_seconds=seconds[0], compile_seconds=seconds[1],
                final_train_loss=float(np.mean(tail)) if tail else math.nan,
                finite=all(bool(pick(h["finite"])) for h in history), trained_with=label,
                train_fingerprint=fp, losses=losses,
            ))
        logger.info("%s: trained seeds %s (%s), %d steps in %.1f s (+%.1f s compile)", variant or "run",
                    group, label, programs.setup.total_steps, seconds[0], seconds[1])
    return variables_out, records


def _train_group(config: ml_collections.ConfigDict, programs: Programs, group: list[int],
                 variant: str, vmap_seeds: bool) -> tuple[Any, list[dict[str, Any]], tuple[float, float]]:
    """Trains one group of seeds; the final (stacked) state, the per-step loss history (host) and
    (train seconds, compile seconds)."""
    from micronet_jax.data.pipeline import make_train_dataset

    source = _train_source(config)
    iters = [iter(make_train_dataset(source, config.data, global_batch_size=int(config.train.batch_size),
                                     seed=int(s), crop_size=int(config.data.crop_size))) for s in group]
    mesh = seed_mesh(len(group)) if vmap_seeds else core.make_mesh("seed", jax.local_devices()[:1])

    def next_batch() -> dict[str, Any]:
        parts = [next(it) for it in iters]
        if not vmap_seeds:
            return parts[0]
        return jax.device_put({k: np.stack([p[k] for p in parts]) for k in parts[0]}, core.split(mesh))

    states = init_seed_states(programs.init, group, stack=vmap_seeds)
    where = core.split(mesh) if vmap_seeds else core.replicated(mesh)
    state = jax.device_put(states if vmap_seeds else states[0], where)
    batch = next_batch()
    compiled, compile_seconds = programs.compiled_step(state, batch, mesh, vmap_seeds)
    n_steps, history = programs.setup.total_steps, []
    t0 = time.perf_counter()
    for i in range(n_steps):
        if i:
            batch = next_batch()
        state, metrics = compiled(state, batch)
        history.append({"loss": metrics["loss"], "finite": metrics["finite"]})
        if (i + 1) % max(1, n_steps // 5) == 0 and i + 1 < n_steps:
            logger.info("%s: step %d/%d (%.1f s)", variant or "run", i + 1, n_steps, time.perf_counter() - t0)
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - t0
    return state, jax.device_get(history), (train_seconds, compile_seconds)
