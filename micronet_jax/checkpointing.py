"""Orbax checkpoints: atomic, asynchronous, the last N plus the best by validation object F1.

A checkpoint holds four items, so that inference can read the weights without the optimizer:

* ``params``: ``{"params", "batch_stats"}`` (what evaluation and prediction need);
* ``opt``: ``{"opt_state", "step", "rng"}`` (what resuming additionally needs);
* ``data_iter``: the grain iterator state, so a resumed run sees exactly the batches it would have;
* ``config``: the run's config as JSON, to explain a mismatch instead of failing on shapes.

Orbax writes each step into a temporary folder and renames it when complete, so a process killed
during a save leaves the previous checkpoint intact and the partial one is ignored and cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("params", "opt", "data_iter", "config")
# Recorded with every save; checkpoints without a validation result at that step carry -1 so that
# BestN never prefers them over a validated one.
BEST_METRIC = "val_f1"


def make_manager(directory: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager that keeps the ``keep`` latest steps plus the best step by ``val_f1``."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=max(1, keep)),
                policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1),
            ]
        ),
        best_fn=lambda m: m[BEST_METRIC],
        best_mode="max",
        enable_async_checkpointing=not read_only,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,
    )
    with _quiet_read_only_notices() if read_only else contextlib.nullcontext():
        return ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS, options=options)


class _DropReadOnlyNotices(logging.Filter):
    """Drops Orbax's "directory is read only" warning, which evaluation would print on every restore."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "read only" not in str(record.msg)


@contextlib.contextmanager
def _quiet_read_only_notices():
    absl_logger, quiet = logging.getLogger("absl"), _DropReadOnlyNotices()
    absl_logger.addFilter(quiet)
    try:
        yield
    finally:
        absl_logger.removeFilter(quiet)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    variables: dict[str, Any],
    opt: dict[str, Any],
    data_iter: Any,
    config: ml_collections.ConfigDict,
    val_f1: float | None,
) -> None:
    """Starts an asynchronous save of one step (call ``manager.wait_until_finished()`` before exit)."""
    from micronet_jax.data.pipeline import checkpoint_save_arg

    items = dict(
        params=ocp.args.StandardSave(variables),
        opt=ocp.args.StandardSave(opt),
        config=ocp.args.JsonSave(json.loads(config.to_json())),
    )
    if data_iter is not None:
        items["data_iter"] = checkpoint_save_arg(data_iter)
    metrics = {BEST_METRIC: float(val_f1) if val_f1 is not None else -1.0}
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def restore_training(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    abstract_variables: Any,
    abstract_opt: Any,
    data_iter: Any,
) -> tuple[Any, Any]:
    """Restores weights, optimizer state and (in place) the data iterator, laid out as the targets."""
    from micronet_jax.data.pipeline import checkpoint_restore_arg

    items = dict(
        params=ocp.args.StandardRestore(abstract_variables),
        opt=ocp.args.StandardRestore(abstract_opt),
    )
    foreign_state = None
    if data_iter is not None:
        foreign_state = _iterator_state_from_other_layout(manager, step)
        if foreign_state is None:
            items["data_iter"] = checkpoint_restore_arg(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if foreign_state is not None:
        data_iter.set_state(foreign_state)
    return restored["params"], restored["opt"]


def _iterator_state_from_other_layout(manager: ocp.CheckpointManager, step: int) -> Any | None:
    """The data-iterator state of a checkpoint written by a different number of processes, else None.

    grain saves one ``process_<p>-of-<P>.json`` per host and its handler only reads the file of the
    current layout, so a 2-host checkpoint would not resume on 1 host (or 4). The state transfers:
    it counts batches taken (``{"next_index": step}``), which is the same on every process, and the
    host's slice of each batch comes from the dataset's definition, not the state (pipeline
    docstring). Any saved process's file therefore positions this process's iterator correctly.
    """
    directory = os.path.join(str(manager.directory), str(step), "data_iter")
    if not os.path.isdir(directory):
        return None
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(f for f in os.listdir(directory) if f.startswith("process_") and f.endswith(".json"))
    if not saved or own in saved:
        return None
    with open(os.path.join(directory, saved[0])) as f:
        return json.load(f)


def resolve(path: str) -> tuple[str, int]:
    """Turns a workdir, its ``checkpoints`` folder or one step folder into (manager dir, step).

    A workdir resolves to its best validated step, or else its latest one.
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    candidates = [os.path.join(path, "checkpoints"), path]
    for directory in candidates:
        if os.path.isdir(directory) and _step_dirs(directory):
            manager = make_manager(directory, read_only=True)
            try:
                step = manager.best_step()
                metrics = _metrics_of(manager, step)
                if step is None or metrics is None or metrics.get(BEST_METRIC, -1.0) < 0:
                    step = manager.latest_step()
            finally:
                manager.close()
            return directory, int(step)
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(path), int(base)
    raise FileNotFoundError(
        f"no checkpoint found in {path}: expected a workdir with checkpoints/, a checkpoints folder, "
        "or one step folder (checkpoints/<step>)"
    )


def _step_dirs(directory: str) -> list[str]:
    return [d for d in os.listdir(directory) if d.isdigit()]


def _metrics_of(manager: ocp.CheckpointManager, step: int | None) -> dict[str, float] | None:
    if step is None:
        return None
    for info in manager._checkpoints:  # noqa: SLF001 - orbax exposes metrics only through this list.
        if info.step == step:
            return info.metrics
    return None


def read_config(directory: str, step: int) -> dict[str, Any]:
    """The config a checkpoint was trained with."""
    manager = make_manager(directory, read_only=True)
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
    finally:
        manager.close()


def check_model_config(saved: dict[str, Any], model_config: ml_collections.ConfigDict) -> None:
    """Raises one clear error listing the model keys where a checkpoint and the config disagree.

    Only keys that change the parameter shapes matter; compute dtype, remat and the transposed-conv
    lowering can differ freely between training and inference.
    """
    shape_keys = ("variant", "multires", "width", "batch_norm", "num_classes")
    saved_model = saved.get("model", {})
    diffs = [
        f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {model_config[k]!r}"
        for k in shape_keys
        if k in saved_model and saved_model[k] != model_config[k]
    ]
    if diffs:
        raise ValueError(
            "the checkpoint was trained with a different model than the config describes ("
            + "; ".join(diffs)
            + "). Pass the training config (it is saved as config.json in the workdir) or override "
            "these keys with --config.model.KEY=VALUE."
        )


def restore_variables(
    path: str, model_config: ml_collections.ConfigDict, abstract_variables: Any
) -> tuple[Any, int]:
    """Weights (and BatchNorm statistics) for inference from a workdir or step folder."""
    directory, step = resolve(path)
    check_model_config(read_config(directory, step), model_config)
    manager = make_manager(directory, read_only=True)
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_on_default_device(abstract_variables))
            ),
        )
    finally:
        manager.close()
    return restored["params"], step


def _on_default_device(abstract: Any) -> Any:
    """Places every leaf without a sharding on this process's first device.

    Without a sharding orbax restores onto the devices that wrote the checkpoint, and refuses
    ("different topology") when those are absent, e.g. weights trained on 8 GPUs or a pod slice and
    evaluated on one GPU. Leaves that already carry a sharding keep it.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None
        else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        abstract,
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Attaches shardings to a pytree of ShapeDtypeStructs (the restore target)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
