"""SIGTERM and SIGINT as a request to stop at the next step boundary, with a checkpoint.

SLURM and Cloud TPU send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT. Either
would otherwise kill the run mid-step and lose everything since the last periodic checkpoint. Here
the handler only records the signal; the training loop asks :meth:`StopRequest.should_stop` after
each step, writes a checkpoint and returns. A second signal gets the default behaviour back, so a
user who presses Ctrl-C twice still stops at once.

Multi-process runs must stop at one agreed step (every process takes part in each save), so there
the request comes from JAX's preemption service, started by ``jax.distributed.initialize`` (it
listens for SIGTERM itself and picks the step, see ``multihost_utils.reached_preemption_sync_point``);
no handler of ours is installed, as it would replace JAX's.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A context manager that turns SIGTERM/SIGINT into ``should_stop(step) == True``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi_process = jax.process_count() > 1

    @property
    def name(self) -> str:
        if self.signum is None:
            return "SIGTERM" if self._multi_process else ""
        return signal.Signals(self.signum).name

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        logger.warning("received %s: finishing the current step, then writing a checkpoint",
                       signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        if not self._multi_process:
            return self.signum is not None
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # No preemption service (jax_enable_preemption_service off).
            return False

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be set from the main thread (a run inside a notebook's worker
        # thread simply keeps the default behaviour).
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
