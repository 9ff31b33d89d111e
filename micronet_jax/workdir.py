"""The run directory: one training run at a time, and what a resumed run may change.

Two guards that run before a training run touches anything in its workdir (the trainer calls
:func:`lock_for_run` and :func:`check_resume`):

* :class:`WorkdirLock`: a job submitted twice would otherwise train two copies into one workdir,
  each overwriting the other's checkpoints and logs. The lock is an ``flock`` on ``WORKDIR/run.lock``,
  which the kernel drops when its process dies (even by SIGKILL), so a lock is never stale while its
  holder lives and is always stale after. The file records the holder's host and pid, for the
  message a second run stops with.
* :func:`resume_changes`: resuming with a different model would fail deep inside Orbax on a shape;
  comparing the saved config first names the keys instead, and leaves the checkpoints untouched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

import ml_collections

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class WorkdirInUseError(RuntimeError):
    """Another live run holds the workdir."""


def check_path(workdir: str) -> str:
    """The absolute workdir, created if missing; a path that names a file is one clear error."""
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(
            f"--workdir {workdir} is a file, not a directory: pass a new or existing run directory"
        )
    os.makedirs(workdir, exist_ok=True)
    return workdir


class WorkdirLock:
    """Holds ``WORKDIR/run.lock`` for the life of a run (a context manager).

    The file is emptied, not removed, on release: removing it would let a run that opened the old
    file and a run that creates a new one both hold "the" lock.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise WorkdirInUseError(
                    f"workdir {self.workdir} is in use by another run (host {holder.get('host', '?')}, "
                    f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}); wait for it to "
                    "finish or stop it, or train into another --workdir"
                ) from None
            raise  # A filesystem without locks: say so rather than run unguarded.
        previous = _read_holder(fd)
        if previous:
            logger.warning(
                "taking over the lock of workdir %s from a run that no longer exists (host %s, pid %s, "
                "started %s)", self.workdir, previous.get("host", "?"), previous.get("pid", "?"),
                previous.get("started", "?"),
            )
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, (record + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    """The recorded holder of a lock file; {} when it is empty (free) or unreadable."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        holder = json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"host": "?", "pid": "? (unreadable lock file)"}
    return holder if isinstance(holder, dict) else {}


# ---------------------------------------------------------------------------------- resume config

# Keys that decide the optimizer's state tree (optax chains differ in structure, not only values):
# its kind, whether gradient clipping and weight decay are on, and whether the state keeps an
# average of the weights (train.ema_decay).
OPTIMIZER_KEYS = ("train.optimizer", "train.grad_clip_norm", "train.weight_decay", "train.ema_decay")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def _optimizer_kind(flat: dict[str, Any]) -> tuple[Any, bool, bool, bool]:
    decay = flat.get("train.weight_decay") or 0
    return (
        "adamw" if flat.get("train.optimizer") == "adamw" or decay > 0 else flat.get("train.optimizer"),
        (flat.get("train.grad_clip_norm") or 0) > 0,
        decay > 0,
        (flat.get("train.ema_decay") or 0) > 0,  # The state holds an average of the weights or not.
    )


# Model keys that change neither the parameters nor the function they compute, only what the backward
# pass stores: a run may resume with them changed (configs/glas_cpu.py turned remat_heads off, #18).
RECOMPUTE_ONLY_KEYS = frozenset({"model.remat", "model.remat_heads"})


def resume_changes(
    saved: dict[str, Any], given: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Compares a workdir's saved config with the one a resumed run was given (both as JSON dicts).

    Returns ``(refused, allowed)``, each a list of ``"key: saved X, given Y"``. Refused: every
    ``model.*`` key (the parameters' shapes, or the function they were trained as) except the
    rematerialisation switches, which only trade memory for recomputation, and the
    optimizer keys when they change the kind of optimizer (the shape of its state). Allowed: the rest
    (schedule length, logging, evaluation, data workers...), which a resumed run simply uses. A key
    that one side lacks (a config from an older version) counts as changed only when both have it.
    """
    old, new = flatten(saved), flatten(given)
    for flat in (old, new):  # Versions before train.ema_decay kept no average: theirs was 0.
        if any(k.startswith("train.") for k in flat):
            flat.setdefault("train.ema_decay", 0.0)
    refused, allowed = [], []
    optimizer_changed = _optimizer_kind(old) != _optimizer_kind(new)
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key]:
            continue
        line = f"{key}: saved {old[key]!r}, given {new[key]!r}"
        if (key.startswith("model.") and key not in RECOMPUTE_ONLY_KEYS) or (
            key in OPTIMIZER_KEYS and optimizer_changed
        ):
            refused.append(line)
        else:
            allowed.append(line)
    return refused, allowed


# ------------------------------------------------------------------------------ the two guards


def lock_for_run(workdir: str, guards: contextlib.ExitStack) -> None:
    """Process 0 takes the lock; the others learn whether it could (one collective at start-up), so a
    refused multi-host run stops on every process instead of waiting for process 0 forever."""
    import jax  # Here, not at the top: the command line imports this module before JAX_PLATFORMS is set.
    import numpy as np

    error: Exception | None = None
    if jax.process_index() == 0:
        try:
            guards.enter_context(WorkdirLock(workdir))
        except WorkdirInUseError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and error is None:
            error = WorkdirInUseError(f"workdir {workdir} is in use by another run "
                                      "(see the message of process 0)")
    if error is not None:
        raise error


def check_resume(config: ml_collections.ConfigDict, workdir: str, ckpt_dir: str) -> None:
    """Refuses a resume whose model or optimizer differs from the saved run; logs other changes."""
    from micronet_jax import checkpointing  # Imports JAX; see lock_for_run.

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
    refused, allowed = resume_changes(saved, json.loads(config.to_json_best_effort()))
    if refused:
        raise ValueError(
            f"cannot resume {workdir}: it was trained with a different model or optimizer ("
            + "; ".join(refused)
            + f"). Resume with the saved values (they are in {os.path.join(workdir, 'config.json')}) "
            "or train into a new --workdir. The checkpoints were not touched."
        )
    if allowed:
        logger.info("resuming %s with changed config keys: %s", workdir, "; ".join(allowed))
