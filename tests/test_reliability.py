"""Reliability through the real command line: resume guards, one run per workdir, SIGTERM, damage.

Every case asserts the exit status, that no thread printed a traceback, and that the message names
what the user has to act on (the key, the folder, the pid). The bitwise references come from the
session's ``uninterrupted`` run (conftest.py): six tiny steps, checkpoints 2, 4 and 6.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
from conftest import REPO, TINY, load_config, restored_params, run_main

from micronet_jax import workdir as workdir_lib
from micronet_jax.preemption import StopRequest


def no_traceback(proc):
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]


def tree_digest(folder):
    """A hash of every file's path and bytes under ``folder``."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def assert_same_params(workdir, reference, step=6):
    config = load_config("default", "tiny")
    got, got_step = restored_params(workdir, config)
    want, want_step = restored_params(reference, config)
    assert got_step == want_step == step
    jax.tree.map(np.testing.assert_array_equal, got, want)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------- resume config


def test_resume_with_another_model_or_optimizer_is_refused_naming_each_key(uninterrupted, tmp_path):
    workdir = tmp_path / "wd"
    shutil.copytree(uninterrupted, workdir)
    before = tree_digest(workdir / "checkpoints"), (workdir / "config.json").read_text()
    proc = run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6",
                    "--config.model.width=0.125", "--config.train.optimizer=adamw", check=False)
    assert proc.returncode == 2
    no_traceback(proc)
    assert "model.width: saved 0.015625, given 0.125" in proc.stderr
    assert "train.optimizer: saved 'adam', given 'adamw'" in proc.stderr
    assert str(workdir) in proc.stderr
    # Neither the checkpoints nor the saved config were touched by the refused run.
    assert (tree_digest(workdir / "checkpoints"), (workdir / "config.json").read_text()) == before


def test_resume_changes_rules():
    saved = {"model": {"width": 0.5, "dtype": "float32"},
             "train": {"optimizer": "adam", "grad_clip_norm": 0.0, "weight_decay": 0.0, "epochs": 2},
             "eval": {"min_size": 20}}
    same = json.loads(json.dumps(saved))
    assert workdir_lib.resume_changes(saved, same) == ([], [])
    given = json.loads(json.dumps(saved))
    given["model"]["dtype"] = "bfloat16"  # Any model key, not only the shape keys.
    given["train"]["epochs"] = 5
    given["train"]["grad_clip_norm"] = 1.0  # Adds a clipping stage: a different optimizer state.
    given["eval"]["min_size"] = 30
    refused, allowed = workdir_lib.resume_changes(saved, given)
    assert refused == ["model.dtype: saved 'float32', given 'bfloat16'",
                       "train.grad_clip_norm: saved 0.0, given 1.0"]
    assert allowed == ["eval.min_size: saved 20, given 30", "train.epochs: saved 2, given 5"]
    # A clipping threshold changed while clipping stays on keeps the optimizer's kind: allowed.
    saved["train"]["grad_clip_norm"], given["train"]["grad_clip_norm"] = 1.0, 2.0
    given["model"]["dtype"] = "float32"
    assert workdir_lib.resume_changes(saved, given)[0] == []
    # Rematerialisation only trades memory for recomputation: allowed, and logged.
    saved["model"]["remat_heads"], given["model"]["remat_heads"] = True, False
    refused, allowed = workdir_lib.resume_changes(saved, given)
    assert refused == [] and "model.remat_heads: saved True, given False" in allowed


def test_resume_with_changed_run_keys_is_logged_and_a_stale_lock_is_taken_over(uninterrupted, tmp_path):
    workdir = tmp_path / "wd"
    shutil.copytree(uninterrupted, workdir)
    pid = dead_pid()
    (workdir / workdir_lib.LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "started": "earlier"}))
    # A finished run only re-validates: cheap, and it runs with the new eval.min_size.
    proc = run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6",
                    "--config.eval.min_size=30")
    no_traceback(proc)
    assert "changed config keys: eval.min_size: saved 20, given 30" in proc.stderr
    assert f"taking over the lock of workdir {workdir}" in proc.stderr and f"pid {pid}," in proc.stderr
    assert (workdir / workdir_lib.LOCK_NAME).read_text() == ""  # Released at the end.
    assert json.loads((workdir / "config.json").read_text())["eval"]["min_size"] == 30


# ------------------------------------------------------------------------------------ workdir


def test_workdir_that_is_a_file_is_one_message(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a run")
    proc = run_main(*TINY, f"--workdir={path}", check=False)
    assert proc.returncode == 2
    no_traceback(proc)
    assert f"--workdir {path} is a file" in proc.stderr


def test_second_run_in_a_held_workdir_names_the_holder(tmp_path):
    with workdir_lib.WorkdirLock(str(tmp_path)):
        proc = run_main(*TINY, f"--workdir={tmp_path}", check=False)
    assert proc.returncode == 2
    no_traceback(proc)
    assert f"workdir {tmp_path} is in use by another run" in proc.stderr
    assert f"host {socket.gethostname()}, pid {os.getpid()}," in proc.stderr
    assert not (tmp_path / "config.json").exists()  # It stopped before writing anything.


# ---------------------------------------------------------------------------------- preemption


def test_sigterm_stops_with_a_checkpoint_and_the_resume_is_bitwise_equal(uninterrupted, tmp_path):
    """SIGTERM mid-run with checkpoint_every=100: the only checkpoint is the one the signal wrote."""
    workdir = tmp_path / "preempted"
    args = [*TINY, f"--workdir={workdir}", "--config.train.max_steps=6",
            "--config.train.checkpoint_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "micronet_jax.main", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Step 1's record appears once step 2 is running: signal then, well before step 6.
        deadline = time.time() + 300
        log = workdir / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and log.read_text().strip():
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    stopped = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert len(stopped) == 1 and 1 <= stopped[0] < 6, stopped  # Not a periodic checkpoint step.
    assert f"stopped by SIGTERM at step {stopped[0]}; rerun the same command to resume" in stderr
    assert (workdir / workdir_lib.LOCK_NAME).read_text() == ""

    resumed = run_main(*args)
    assert f"resumed from step {stopped[0]}" in resumed.stderr
    assert_same_params(workdir, uninterrupted)


def test_stop_request_records_the_first_signal_and_gives_the_second_the_old_handler():
    seen = []
    before = lambda s, f: seen.append(s)  # noqa: E731 - stands in for the default Ctrl-C handler.
    previous = signal.signal(signal.SIGINT, before)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with StopRequest() as stop:
            assert not stop.should_stop(1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # Python runs the handler at the next bytecode boundary.
            assert stop.should_stop(1) and stop.name == "SIGINT" and seen == []
            os.kill(os.getpid(), signal.SIGINT)  # A second Ctrl-C reaches the handler from before.
            time.sleep(0.01)
            assert seen == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------- damaged checkpoints


def corrupt(folder):
    """Overwrites every file of a folder, as a faulty disk or filesystem might."""
    count = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
            count += 1
    assert count > 10  # params, opt, data_iter, config and metrics items all hit.


def test_damaged_newest_checkpoint_falls_back_everywhere(uninterrupted, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(uninterrupted, workdir)
    bad = workdir / "checkpoints" / "6"
    corrupt(bad)

    # Evaluation of the workdir uses the newest readable checkpoint, and says which it skipped.
    out = tmp_path / "eval"
    proc = run_main(*TINY, "--mode=evaluate", f"--checkpoint={workdir}", f"--output={out}")
    no_traceback(proc)
    assert f"checkpoint folder {bad} cannot be read" in proc.stderr and "using step 4" in proc.stderr
    assert json.load(open(out / "report.json"))["step"] == 4
    # The damaged folder named explicitly is refused, naming it.
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(images / "a.png")
    proc = run_main(*TINY, "--mode=predict", f"--checkpoint={bad}", f"--input={images}",
                    check=False)
    assert proc.returncode == 2
    no_traceback(proc)
    assert f"checkpoint folder {bad} cannot be read" in proc.stderr

    # Training resumes from step 4, moves step 6 aside (kept, not deleted) and trains it again.
    proc = run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6")
    no_traceback(proc)
    assert f"checkpoint folder {bad} cannot be read" in proc.stderr
    assert "resumed from step 4" in proc.stderr
    kept = workdir / "damaged_checkpoints" / "6"
    assert f"moved it to {kept}" in proc.stderr
    assert (kept / "_CHECKPOINT_METADATA").read_bytes() == b"\x00garbage"
    # Steps 5 and 6 trained again from step 4 equal the uninterrupted run's (and so a run resumed
    # from step 4 with the damaged folder removed by hand: resuming is bitwise exact).
    assert_same_params(workdir, uninterrupted)


def test_no_readable_checkpoint_is_one_message_and_nothing_moves(uninterrupted, tmp_path):
    workdir = tmp_path / "all_damaged"
    shutil.copytree(uninterrupted, workdir)
    for step in ("2", "4", "6"):
        corrupt(workdir / "checkpoints" / step)
    proc = run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6", check=False)
    assert proc.returncode == 2
    no_traceback(proc)
    assert f"no checkpoint in {workdir / 'checkpoints'} can be read" in proc.stderr
    for step in ("2", "4", "6"):
        assert str(workdir / "checkpoints" / step) in proc.stderr
        assert (workdir / "checkpoints" / step).is_dir()
    assert not (workdir / "damaged_checkpoints").exists()
