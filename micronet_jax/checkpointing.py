"""Orbax checkpoints: atomic, asynchronous, the last N plus the best by validation object F1.

A checkpoint holds four items, so that inference can read the weights without the optimizer:

* ``params``: ``{"params", "batch_stats"}`` (what evaluation and prediction need: with
  ``train.ema_decay`` the moving average of the weights, else the last step's);
* ``opt``: ``{"opt_state", "step", "rng"}`` (what resuming additionally needs), with the last step's
  weights as ``trained`` when ``params`` holds their average;
* ``data_iter``: the grain iterator state, so a resumed run sees exactly the batches it would have;
* ``config``: the run's config as JSON, to explain a mismatch instead of failing on shapes.

:func:`save_state` / :func:`restore_state` are the one mapping between a :class:`~micronet_jax.core.TrainState`
and those items; :func:`save_weights` writes ``params`` and ``config`` only (the ablation runner's
trained seeds), which ``--mode=evaluate|tune|predict`` read like any other checkpoint.
:func:`restore_variables` reads ``params`` for inference, or with ``weights="trained"``
(``eval.weights``) the last step's weights of a run trained with an average, from ``opt``.

Orbax writes each step into a temporary folder and renames it when complete, so a process killed
during a save leaves the previous checkpoint intact and the partial one is ignored and cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Callable, TypeVar

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from micronet_jax.core import TrainState

logger = logging.getLogger(__name__)
T = TypeVar("T")

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


def save_state(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    *,
    config: ml_collections.ConfigDict,
    data_iter: Any = None,
    val_f1: float | None = None,
) -> None:
    """Starts an asynchronous save of a training state (call ``manager.wait_until_finished()`` before
    exit): weights as ``params``, what resuming also needs as ``opt``, and the data iterator."""
    items = dict(
        params=ocp.args.StandardSave(state.inference_variables()),
        opt=ocp.args.StandardSave(_opt_item(state)),
    )
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    _save(manager, step, items, config, val_f1)


def save_weights(
    manager: ocp.CheckpointManager,
    step: int,
    variables: dict[str, Any],
    *,
    config: ml_collections.ConfigDict,
    val_f1: float | None = None,
) -> None:
    """Saves weights only (``{"params"[, "batch_stats"]}``): a checkpoint that evaluation, tuning and
    prediction read like any other, but that cannot be resumed (the ablation runner's format)."""
    _save(manager, step, dict(params=ocp.args.StandardSave(variables)), config, val_f1)


def _save(manager: ocp.CheckpointManager, step: int, items: dict[str, Any],
          config: ml_collections.ConfigDict, val_f1: float | None) -> None:
    items["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
    metrics = {BEST_METRIC: float(val_f1) if val_f1 is not None else -1.0}
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)


def _opt_item(state: TrainState) -> dict[str, Any]:
    item = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
    if state.ema:  # ``params`` holds the average; resuming also needs the weights being trained.
        item["trained"] = state.variables()
    return item


def restore_state(directory: str, step: int, target: TrainState, data_iter: Any = None) -> TrainState:
    """Restores one step's training state laid out as ``target`` (shapes, dtypes, shardings) and,
    in place, the data iterator.

    Reads the step's items directly rather than through a manager: a manager cannot even be opened
    while another step folder of the same directory is damaged (it reads every step's metrics).
    """
    step_dir = os.path.join(directory, str(step))
    variables = _restore_item(step_dir, "params", ocp.args.StandardRestore(target.inference_variables()))
    opt = _restore_item(step_dir, "opt", ocp.args.StandardRestore(_opt_item(target)))
    ema = {}
    if target.ema:
        ema, variables = variables, opt["trained"]
    if data_iter is not None:
        # Last, so a step whose arrays are damaged never moves the iterator.
        foreign_state = _iterator_state_from_other_layout(step_dir)
        if foreign_state is None:
            _restore_item(step_dir, "data_iter", grain.checkpoint.CheckpointRestore(data_iter))
        else:
            data_iter.set_state(foreign_state)
    return TrainState(
        step=opt["step"], params=variables["params"], batch_stats=variables.get("batch_stats", {}),
        opt_state=opt["opt_state"], rng=opt["rng"], ema=ema,
    )


def _restore_item(step_dir: str, item: str, args: Any) -> Any:
    """One item of one step folder, with the handler that matches ``args``."""
    if isinstance(args, ocp.args.StandardRestore):
        handler = ocp.StandardCheckpointHandler()
    elif isinstance(args, ocp.args.JsonRestore):
        handler = ocp.JsonCheckpointHandler()
    else:  # The grain iterator's CheckpointRestore: grain's own handler reads it.
        handler = grain.checkpoint.CheckpointHandler()
    checkpointer = ocp.Checkpointer(handler)
    try:
        return checkpointer.restore(os.path.join(step_dir, item), args=args)
    finally:
        checkpointer.close()


def _iterator_state_from_other_layout(step_dir: str) -> Any | None:
    """The data-iterator state of a checkpoint written by a different number of processes, else None.

    grain saves one ``process_<p>-of-<P>.json`` per host and its handler only reads the file of the
    current layout, so a 2-host checkpoint would not resume on 1 host (or 4). The state transfers:
    it counts batches taken (``{"next_index": step}``), which is the same on every process, and the
    host's slice of each batch comes from the dataset's definition, not the state (pipeline
    docstring). Any saved process's file therefore positions this process's iterator correctly.
    """
    directory = os.path.join(step_dir, "data_iter")
    if not os.path.isdir(directory):
        return None
    own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = sorted(f for f in os.listdir(directory) if f.startswith("process_") and f.endswith(".json"))
    if not saved or own in saved:
        return None
    with open(os.path.join(directory, saved[0])) as f:
        return json.load(f)


class DamagedCheckpointError(ValueError):
    """A checkpoint step folder whose files cannot be read (a disk or filesystem fault, not a crash of
    the run: a run killed mid-save leaves the previous checkpoint intact, see the module docstring)."""


# Damaged step folders of a resumed run are moved here (inside the workdir), never deleted: they stay
# for a person to inspect, and out of the way of orbax, which would otherwise refuse to open the
# checkpoints folder or to save that step again.
DAMAGED_DIR = "damaged_checkpoints"


def step_folders(directory: str) -> list[int]:
    """The committed step folders of a checkpoints directory, newest first (tmp folders excluded)."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True)


def describe_error(error: BaseException) -> str:
    """``Type: first line`` of an error, short enough for a one-line warning."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def restore_newest_readable(directory: str, restore: Callable[[int], T]) -> tuple[int | None, T | None, list[tuple[int, str]]]:
    """Restores the newest step of ``directory`` that can be read.

    Returns ``(step, restore(step), damaged)`` where ``damaged`` lists ``(step, why)`` for the newer
    folders that failed; ``(None, None, [])`` when there is no checkpoint. A folder only counts as
    damaged once an older one has restored with the same targets, so a run whose config does not
    match its checkpoints fails on every step and raises, naming them, without touching any.
    """
    failures: list[tuple[int, str]] = []
    for step in step_folders(directory):
        try:
            return step, restore(step), failures
        except Exception as e:  # noqa: BLE001 - any read failure; the error is named in the message.
            failures.append((step, describe_error(e)))
    if not failures:
        return None, None, []
    raise DamagedCheckpointError(
        f"no checkpoint in {directory} can be read: "
        + "; ".join(f"{os.path.join(directory, str(s))} ({why})" for s, why in failures)
        + ". Nothing was changed. Move the damaged folders away to train from scratch in this workdir."
    )


def set_aside(directory: str, step: int) -> str:
    """Moves a damaged step folder to ``<workdir>/damaged_checkpoints/<step>`` and returns where."""
    target_root = os.path.join(os.path.dirname(os.path.abspath(directory)), DAMAGED_DIR)
    os.makedirs(target_root, exist_ok=True)
    target, n = os.path.join(target_root, str(step)), 1
    while os.path.exists(target):
        target, n = os.path.join(target_root, f"{step}.{n}"), n + 1
    os.replace(os.path.join(directory, str(step)), target)
    return target


def resolve(path: str) -> tuple[str, int]:
    """Turns a workdir, its ``checkpoints`` folder or one step folder into (checkpoints dir, step).

    A workdir resolves to its best validated step, or else its latest one.
    """
    directory, steps, _ = candidates(path)
    return directory, steps[0]


def candidates(path: str) -> tuple[str, list[int], bool]:
    """(checkpoints dir, steps in order of preference, whether one step folder was named).

    For a workdir or checkpoints folder: the best validated step (else the latest) first, then the
    others newest first, the fallbacks when the first cannot be read.
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    for directory in (os.path.join(path, "checkpoints"), path):
        steps = step_folders(directory)
        if steps:
            scores = {s: _val_f1(directory, s) for s in steps}
            validated = [s for s in steps if scores[s] is not None and scores[s] >= 0]
            if validated:  # BestN's choice: the highest F1, among equal ones the latest step.
                first = max(validated, key=lambda s: (scores[s], s))
                steps = [first] + [s for s in steps if s != first]
            return directory, steps, False
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(path):
        return os.path.dirname(path), [int(base)], True
    raise FileNotFoundError(
        f"no checkpoint found in {path}: expected a workdir with checkpoints/, a checkpoints folder, "
        "or one step folder (checkpoints/<step>)"
    )


def _val_f1(directory: str, step: int) -> float | None:
    """The validation F1 recorded with a step (-1 when it was not validated); None when unreadable."""
    try:
        metrics = _read_metrics(directory, step)
    except Exception:  # noqa: BLE001 - a damaged folder; restore_variables names it if it is tried.
        return None
    return float(metrics.get(BEST_METRIC, -1.0)) if isinstance(metrics, dict) else None


def _read_metrics(directory: str, step: int) -> dict[str, Any]:
    checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler(filename="metrics"))
    try:
        return checkpointer.restore(os.path.join(directory, str(step), "metrics"))
    finally:
        checkpointer.close()


def read_config(directory: str, step: int) -> dict[str, Any]:
    """The config a checkpoint was trained with."""
    return dict(_restore_item(os.path.join(directory, str(step)), "config", ocp.args.JsonRestore()))


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


# Which weights inference reads from a checkpoint (``eval.weights``): "inference" the ``params`` item
# (the average of the weights when the run was trained with ``train.ema_decay``, else the last
# step's); "trained" the last step's weights (the ``opt`` item's ``trained`` copy when ``params`` holds
# an average, else ``params`` itself), so an averaged run can be scored against its own weights.
WEIGHTS = ("inference", "trained")


def restore_variables(
    path: str, model_config: ml_collections.ConfigDict, abstract_variables: Any,
    weights: str = "inference",
) -> tuple[Any, int]:
    """Weights (and BatchNorm statistics) for inference from a workdir or step folder.

    A workdir whose preferred checkpoint is damaged falls back to the newest readable one, with a
    warning naming the damaged folder; a step folder named explicitly is used or refused, never
    swapped for another. ``weights`` is one of :data:`WEIGHTS`.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"config eval.weights={weights!r} must be one of {', '.join(WEIGHTS)}")
    directory, steps, explicit = candidates(path)
    target = _on_default_device(abstract_variables)
    damaged: list[tuple[int, str]] = []
    for step in steps:
        step_dir = os.path.join(directory, str(step))
        try:
            saved = read_config(directory, step)
        except Exception as e:  # noqa: BLE001 - any read failure is reported with its folder.
            damaged.append((step, describe_error(e)))
            continue
        check_model_config(saved, model_config)  # A mismatch is the user's to fix, not a fallback.
        from_opt = weights == "trained" and _trained_with_average(saved)
        if from_opt and not os.path.isdir(os.path.join(step_dir, "opt")):
            raise ValueError(
                f"checkpoint folder {step_dir} holds only the average of the weights (trained with "
                f"train.ema_decay={saved['train']['ema_decay']}, saved as weights only): the last "
                "step's weights are not in it. Use --config.eval.weights=inference.")
        try:
            if from_opt:
                variables = _restore_trained(step_dir, target)
            else:
                variables = _restore_item(step_dir, "params", ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001
            damaged.append((step, describe_error(e)))
            continue
        for s, why in damaged:
            logger.warning("checkpoint folder %s cannot be read (%s); using step %d instead",
                           os.path.join(directory, str(s)), why, step)
        return variables, step
    if explicit:
        raise DamagedCheckpointError(
            f"checkpoint folder {os.path.join(directory, str(steps[0]))} cannot be read "
            f"({damaged[0][1]}): its files are damaged. Pass the workdir (--checkpoint WORKDIR) to "
            "use its newest readable checkpoint, or another step folder."
        )
    raise DamagedCheckpointError(
        f"no checkpoint in {directory} can be read: "
        + "; ".join(f"{os.path.join(directory, str(s))} ({why})" for s, why in damaged)
    )


def _trained_with_average(saved: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``params`` hold an average of the weights (a config saved before
    ``train.ema_decay`` existed was trained without one)."""
    return float(saved.get("train", {}).get("ema_decay", 0.0) or 0.0) > 0.0


def _restore_trained(step_dir: str, target: Any) -> Any:
    """The ``opt`` item's ``trained`` weights alone, laid out as ``target``, without reading the
    optimizer state (which needs the optimizer's tree to restore)."""
    item = {"trained": target}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        return checkpointer.restore(
            os.path.join(step_dir, "opt"),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )["trained"]
    finally:
        checkpointer.close()


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
