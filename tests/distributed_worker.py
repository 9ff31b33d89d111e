"""One process of the multi-host training test (tests/test_distributed.py); not a pytest module.

It runs the real ``train.train_and_evaluate`` on a tiny config, so the multi-host path under test is
the production one, not a copy. Two things are added from outside, without touching the trainer:

* ``pipeline.make_train_dataset`` is wrapped so that every batch this process consumes is recorded as
  one short hash per sample. The test compares the hashes across processes (disjoint shards) and with
  a single-process run (same global batches), which is the only way to see what each host really fed.
* The record is written as JSON to ``--record`` when training returns.

Usage (the test sets ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=N``)::

    python tests/distributed_worker.py --workdir W --max-steps 3 --record r.json \
        [--num-processes 2 --process-id 0 --port 12345]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import sys
from typing import Any, Callable

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(max_steps: int) -> ml_collections.ConfigDict:
    """``configs/default.py:tiny`` (the tests' shrunk pipeline) with a global batch of 8.

    Batch 8 gives one sample per device on 8 devices. With ``patches_per_epoch=8`` every step is an
    epoch, so the paper's per-epoch learning rate and the 1/epoch aux weight change at every step
    and the comparison also covers the schedule. ``checkpoint_every=3`` makes a 5-step run save
    step 3 too, so both steps can be compared with the 2-process run.
    """
    spec = importlib.util.spec_from_file_location("configs_default", os.path.join(REPO, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.train.batch_size = 8
    c.train.patches_per_epoch = 8
    c.train.epochs = 10
    c.train.max_steps = max_steps
    c.train.checkpoint_every = 3
    return c


def sample_hash(image: Any) -> str:
    """A short content hash of one sample; collisions are irrelevant at a few dozen samples."""
    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def _compile_then_barrier(compile_train_step: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``core.compile_train_step`` so every process compiles first, then waits for the others.

    Why: on CPU the step's gradient all-reduce goes through gloo, whose TCP pairs are set up at the
    first collective with a fixed ~30 s connect timeout. On a busy 2-core machine one process can
    finish compiling a minute after the other, and the early one then fails with "Gloo context
    initialization failed: Connect timeout". Compiling ahead of time and meeting at a barrier of the
    coordination service (no gloo, long timeout) starts the first step together. GPUs (NCCL) and
    TPUs do not have this problem, so the trainer itself does not do it.
    """

    def wrapped(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        jitted = compile_train_step(*args, **kwargs)
        compiled = None

        def step(state: Any, batch: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = jitted.lower(state, batch).compile()
                from jax._src import distributed  # The client has no public barrier without gloo.

                if distributed.global_state.client is not None:
                    distributed.global_state.client.wait_at_barrier("train_step_compiled", 600_000)
            return compiled(state, batch)

        return step

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--record", required=True, help="JSON file for the consumed-batch hashes")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format=f"[p{args.process_id}] %(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config = tiny_config(args.max_steps)
    if args.num_processes > 1:
        config.distributed.initialize = True
        config.distributed.coordinator_address = f"127.0.0.1:{args.port}"
        config.distributed.num_processes = args.num_processes
        config.distributed.process_id = args.process_id

    from micronet_jax import core, train
    from micronet_jax.data import pipeline

    consumed: list[list[str]] = []
    original = pipeline.make_train_dataset

    def recording_dataset(*a: Any, **kw: Any) -> Any:
        """The real dataset plus a pass-through map that hashes each batch as the trainer takes it.

        The map sits after grain's prefetch, so it runs only for batches that ``next()`` returns,
        and the iterator stays checkpointable (map is stateless).
        """

        def record(batch: dict[str, Any]) -> dict[str, Any]:
            consumed.append([sample_hash(x) for x in batch["image"]])
            return batch

        return original(*a, **kw).map(record)

    pipeline.make_train_dataset = recording_dataset
    core.compile_train_step = _compile_then_barrier(core.compile_train_step)
    result = train.train_and_evaluate(config, args.workdir)

    import jax

    with open(args.record, "w") as f:
        json.dump(
            {
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "local_device_count": jax.local_device_count(),
                "step": int(result["step"]),
                "val_f1": (result["summary"] or {}).get("f1"),
                "batches": consumed,
            },
            f,
        )


if __name__ == "__main__":
    main()
