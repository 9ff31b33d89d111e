"""Multi-host training on one machine: 2 CPU processes x 4 simulated devices vs 1 process x 8 devices.

What a real pod or SLURM job relies on, checked with the production loop (tests/distributed_worker.py
calls ``train.train_and_evaluate``):

* the two processes read disjoint halves of every global batch, and together exactly the batches a
  single process reads;
* training over 2 processes gives the same parameters as over 1 process (the gradient all-reduce
  crosses the process boundary through gloo);
* only process 0 writes logs, while checkpoints are written by both (one data-iterator file each);
* a 2-process checkpoint restores in 1 process (on 8 devices to continue training, and on 1 device
  for inference) and the continued run equals an uninterrupted one.

All runs happen once, in one module fixture: three training processes at a time at most, and the
resume reuses the single-process run's compiled programs through the persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from conftest import REPO

from micronet_jax import checkpointing
from micronet_jax.models import build_model
from micronet_jax.models.summary import abstract_variables

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # About 1.5 min with a warm compilation cache, 3 min cold (2 cores).

WORKER = Path(__file__).parent / "distributed_worker.py"
# Generous for a 2-core machine shared with other jobs; an idle one needs about a third of it.
TIMEOUT_S = 420


def _free_port() -> int:
    """A port the OS just handed out (bind to 0), for the coordinator; no extra test dependency."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir: Path, record: Path, log: Path, max_steps: int, devices: int,
           process: tuple[int, int, int] | None = None) -> subprocess.Popen:
    """Starts one worker; ``process`` = (process_id, num_processes, port) for a multi-process run."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    cmd = [sys.executable, str(WORKER), f"--workdir={workdir}", f"--max-steps={max_steps}",
           f"--record={record}"]
    if process is not None:
        pid, n, port = process
        cmd += [f"--process-id={pid}", f"--num-processes={n}", f"--port={port}"]
    with open(log, "w") as stderr:  # The child keeps its own handle.
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def _wait_all(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Waits for every worker; on a failure or the timeout kills the rest and shows every log.

    A crashed peer leaves the other process blocked in a collective, so one failure ends them all
    at once instead of waiting out the timeout.
    """
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while time.monotonic() < deadline:
        codes = {name: p.poll() for name, (p, _) in procs.items()}
        bad = [n for n, c in codes.items() if c not in (None, 0)]
        if bad:
            failed = f"{bad[0]} exited with {codes[bad[0]]}"
            break
        if all(c == 0 for c in codes.values()):
            return
        time.sleep(0.5)
    else:
        failed = f"timeout after {TIMEOUT_S} s"
    for p, _ in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    logs = "\n".join(
        f"----- {name} (exit {p.returncode}) stderr tail:\n{log.read_text()[-6000:]}"
        for name, (p, log) in procs.items()
    )
    pytest.fail(f"{failed}\n{logs}")


def _params(workdir: Path, step: int) -> dict[str, Any]:
    """The parameters of one checkpoint step, restored the way inference does: on this process's
    default (single) device, whatever the number of processes and devices that wrote them."""
    config = tiny_config(step)
    target = abstract_variables(build_model(config.model))
    variables, restored_step = checkpointing.restore_variables(
        str(workdir / "checkpoints" / str(step)), config.model, target
    )
    assert restored_step == step
    return jax.device_get(variables["params"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """2-process 3-step run and 1-process 5-step reference (concurrently), then a 1-process resume
    of the 2-process checkpoint to step 5."""
    root = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    t0 = time.perf_counter()
    procs = {
        f"process {i} of 2": (
            _start(root / "multi", root / f"multi_{i}.json", root / f"multi_{i}.log", 3, 4, (i, 2, port)),
            root / f"multi_{i}.log",
        )
        for i in range(2)
    }
    procs["single-process reference"] = (
        _start(root / "single", root / "single.json", root / "single.log", 5, 8), root / "single.log"
    )
    _wait_all(procs)
    t1 = time.perf_counter()
    # Resume a copy, so the 2-process workdir stays as it was written.
    shutil.copytree(root / "multi", root / "resumed")
    procs = {"single-process resume": (
        _start(root / "resumed", root / "resumed.json", root / "resumed.log", 5, 8), root / "resumed.log"
    )}
    _wait_all(procs)
    t2 = time.perf_counter()
    print(f"\n2-process + reference runs: {t1 - t0:.1f} s; resume: {t2 - t1:.1f} s")
    records = {
        name: json.loads((root / f"{name}.json").read_text())
        for name in ("multi_0", "multi_1", "single", "resumed")
    }
    return {"root": root, **records}


def test_each_process_reads_a_disjoint_half_of_every_global_batch(runs):
    p0, p1, single = runs["multi_0"], runs["multi_1"], runs["single"]
    assert (p0["process_index"], p1["process_index"]) == (0, 1)
    assert p0["process_count"] == p1["process_count"] == 2
    assert p0["device_count"] == 8 and p0["local_device_count"] == 4
    assert single["process_count"] == 1 and single["device_count"] == 8
    assert len(p0["batches"]) == len(p1["batches"]) == 3
    seen0 = {h for batch in p0["batches"] for h in batch}
    seen1 = {h for batch in p1["batches"] for h in batch}
    assert len(seen0) == len(seen1) == 12  # 3 steps x 4 local samples, no repeats.
    assert not seen0 & seen1
    # Process 0's rows then process 1's rows are the single-process global batch, in order.
    for step, (a, b) in enumerate(zip(p0["batches"], p1["batches"])):
        assert a + b == single["batches"][step], f"step {step + 1}"


def test_two_processes_train_the_same_parameters_as_one(runs):
    root = runs["root"]
    assert runs["multi_0"]["step"] == runs["multi_1"]["step"] == 3
    multi, single = _params(root / "multi", 3), _params(root / "single", 3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), multi, single)
    # Both processes validated the same replicated weights.
    assert runs["multi_0"]["val_f1"] == runs["multi_1"]["val_f1"]


def test_only_process_0_writes_logs_but_both_write_checkpoints(runs):
    wd = runs["root"] / "multi"
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    val_steps = [r["step"] for r in records if "val/f1" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps, train_steps  # No duplicates.
    assert val_steps == [3]
    assert len(list((wd / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (wd / "config.json").exists() and (wd / "eval_val" / "report.json").exists()
    assert list((wd / "eval_val" / "overlays").glob("*.png"))
    step_dir = wd / "checkpoints" / "3"
    assert sorted(os.listdir(step_dir / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert not list((wd / "checkpoints").glob("*tmp*"))  # Every save was committed.


def test_two_process_checkpoint_resumes_in_one_process_like_an_uninterrupted_run(runs):
    root, resumed, single = runs["root"], runs["resumed"], runs["single"]
    assert resumed["process_count"] == 1 and resumed["device_count"] == 8
    assert resumed["step"] == 5
    # The data stream continues exactly where the two processes left it.
    assert resumed["batches"] == single["batches"][3:5]
    params = _params(root / "resumed", 5)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, _params(root / "single", 5))
    steps = [json.loads(line)["step"] for line in open(root / "resumed" / "metrics.jsonl")]
    assert max(steps) == 5
