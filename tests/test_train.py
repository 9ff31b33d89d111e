"""The training loop as users run it: resume after SIGKILL, sharding, NaN handling, clear errors."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
from conftest import REPO, load_config, run_main

from micronet_jax import checkpointing, train
from micronet_jax.data import DataError
from micronet_jax.models import build_model
from micronet_jax.models.summary import abstract_variables

TINY = ["--config", "configs/default.py:tiny"]


def final_params(workdir, config):
    model = build_model(config.model)
    variables, step = checkpointing.restore_variables(
        str(workdir), config.model, abstract_variables(model)
    )
    return jax.device_get(variables["params"]), step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps straight through (the reference for the resume test)."""
    workdir = tmp_path_factory.mktemp("straight")
    run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6")
    return workdir


def test_main_job_leaves_checkpoint_logs_and_reports(uninterrupted):
    wd = uninterrupted
    assert sorted(os.listdir(wd / "checkpoints"))[-1] == "6"
    records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert any("val/f1" in r for r in records)
    report = json.load(open(wd / "eval_val" / "report.json"))
    assert {"f1", "object_dice", "object_hausdorff", "tp", "fp", "fn"} <= set(report["metrics"])
    assert glob.glob(str(wd / "eval_val" / "overlays" / "*.png"))
    assert (wd / "training_curves.png").exists()
    assert glob.glob(str(wd / "tensorboard" / "events.out.tfevents.*"))
    saved = json.load(open(wd / "config.json"))
    assert saved["model"]["width"] == pytest.approx(1 / 64)


def test_periodic_validation_on_the_last_step_still_writes_the_reports(tmp_path):
    # eval_every dividing the run length used to make the last validation a periodic one, which
    # skipped report.json and the overlays.
    run_main(*TINY, f"--workdir={tmp_path}", "--config.train.max_steps=2", "--config.train.eval_every=2")
    assert (tmp_path / "eval_val" / "report.json").exists()
    assert glob.glob(str(tmp_path / "eval_val" / "overlays" / "*.png"))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert sum("val/f1" in r for r in records) == 1  # validated once, not again after the loop


def test_resume_after_sigkill_is_bitwise_identical(uninterrupted, tmp_path):
    """Kill the run (during a save if we catch one), restart it, and get exactly the same params."""
    config = load_config("default", "tiny")
    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "micronet_jax.main", *TINY, f"--workdir={workdir}",
           "--config.train.max_steps=6"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 300
    try:
        # Wait for step 2 to be committed, then kill as soon as the step-4 save is in flight.
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpts) if ckpts.exists() else []
            if "2" in names and any(n.startswith("4") for n in names):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    manager = checkpointing.make_manager(str(ckpts), read_only=True)
    killed_at = manager.latest_step()
    manager.close()
    assert killed_at in (2, 4), f"latest committed step after the kill: {killed_at}"

    run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6")
    resumed, step = final_params(workdir, config)
    reference, ref_step = final_params(uninterrupted, config)
    assert step == ref_step == 6
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)
    # The log reads like one run: what the killed run logged after its checkpoint was dropped.
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert max(train_steps) == 6 and len(train_steps) == len(set(train_steps))


def test_partial_save_is_ignored_and_previous_checkpoint_restores(uninterrupted, tmp_path):
    """What a kill during an orbax save leaves behind (a *.orbax-checkpoint-tmp folder) is skipped."""
    import shutil

    workdir = tmp_path / "partial"
    shutil.copytree(uninterrupted, workdir)
    ckpts = workdir / "checkpoints"
    partial = ckpts / "8.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / "6", partial)
    for item in ("params", "opt"):
        shutil.rmtree(partial / item)  # Half-written: the heavy items never arrived.
    manager = checkpointing.make_manager(str(ckpts))
    assert manager.latest_step() == 6
    manager.close()
    config = load_config("default", "tiny")
    params, step = final_params(workdir, config)
    assert step == 6
    chex.assert_tree_all_finite(params)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = train.global_batch
    calls = []

    def poisoned(local, mesh):
        calls.append(1)
        if len(calls) >= 4:  # The 4th batch onwards carries a NaN weight: step 4's loss is NaN.
            local = dict(local, weight=np.full_like(local["weight"], np.nan))
        return real(local, mesh)

    monkeypatch.setattr(train, "global_batch", poisoned)
    config = load_config("default", "tiny")
    config.train.max_steps = 6
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss at step 4.*step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    params, step = final_params(tmp_path, config)
    assert step == 2
    chex.assert_tree_all_finite(params)


def test_one_step_on_8_devices_equals_1_device(tmp_path):
    """Runs in a subprocess: the simulated device count is fixed when JAX starts."""
    script = r"""
import jax, numpy as np, chex, sys
sys.path.insert(0, "tests")
from conftest import load_config
from micronet_jax import train
assert jax.device_count() == 8, jax.devices()
config = load_config("default", "tiny")
config.train.batch_size = 8
rng = np.random.default_rng(0)
batch = {"image": rng.normal(size=(8, 508, 508, 3)).astype(np.float32),
         "label": (rng.random((8, 508, 508)) > 0.5).astype(np.int32),
         "weight": rng.random((8, 508, 508)).astype(np.float32)}
results = []
for devices in (jax.devices(), jax.devices()[:1]):
    t = train.Trainer(config, devices=devices)
    state = t.initial_state()
    state, metrics = t.train_step(state, train.global_batch(batch, t.mesh))
    results.append((jax.device_get(state.params), float(metrics["loss"]), float(metrics["grad_norm"])))
# Adam is blind to the gradient's scale, so check that on the gradient norm itself.
assert abs(results[0][1] - results[1][1]) < 1e-5, results
assert abs(results[0][2] - results[1][2]) < 1e-5 * results[1][2], results
# Adam's first update is lr * g / (|g| + eps), about +-lr (1e-3) per element: a gradient pointing
# elsewhere moves elements by up to 2e-3. The summation order of the 8-way reduction can still
# move the update of a near-zero gradient by a small fraction of lr, hence atol 1e-5 (1% of lr).
chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
config.train.batch_size = 4
try:
    train.Trainer(config)
except ValueError as e:
    assert "train.batch_size=4" in str(e) and "number of devices (8)" in str(e), e
else:
    raise AssertionError("batch 4 on 8 devices was accepted")
print("OK")
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_unknown_config_key_is_one_clear_message():
    proc = run_main(*TINY, "--mode=summary", "--config.train.batch_sise=4", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'train.batch_sise'" in proc.stderr
    assert "batch_size" in proc.stderr  # The did-you-mean hint.
    assert "Traceback" not in proc.stderr


def test_missing_data_root_names_the_key(tmp_path):
    proc = run_main("--config", "configs/glas_508.py", f"--workdir={tmp_path}",
                    "--config.model.width=0.015625", check=False)
    assert proc.returncode == 2
    assert "data.root" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_folder_names_the_folder(tmp_path):
    config = load_config("glas_508")
    config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        train.train_and_evaluate(config, str(tmp_path / "wd"))


def test_empty_dataset_names_the_folder(tmp_path):
    config = load_config("default", "tiny")
    config.data.source = "folder"
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    config.data.root = str(tmp_path / "data")
    with pytest.raises(DataError, match=str(tmp_path / "data")):
        train.train_and_evaluate(config, str(tmp_path / "wd"))


def test_batch_not_divisible_by_accumulation_names_the_keys():
    config = load_config("default", "tiny")
    config.train.batch_size = 3
    config.train.grad_accum_steps = 2
    with pytest.raises(ValueError, match=r"train.batch_size=3.*grad_accum_steps=2"):
        train.Trainer(config)


def test_paper_schedule_and_aux_weight():
    from micronet_jax import losses

    config = load_config("glas_508")
    schedule = losses.learning_rate_schedule(config.train, steps_per_epoch=10, total_steps=250)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 9, 10, 50, 249)],
        [1e-3, 1e-3, 1e-3 * 10 ** -0.2, 1e-4, 1e-3 * 10 ** (-24 / 5)], rtol=1e-5,
    )
    np.testing.assert_allclose(
        [float(losses.aux_weight(s, 10)) for s in (0, 9, 10, 25)], [1, 1, 0.5, 1 / 3], rtol=1e-6
    )
    assert float(losses.aux_weight(0, 10, enabled=False)) == 0.0


def test_keeps_latest_and_best_validated_checkpoint(tmp_path):
    config = load_config("default", "tiny")
    config.train.max_steps = 6
    config.train.eval_every = 2
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 1
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    f1 = {r["step"]: r["val/f1"] for r in records if "val/f1" in r}
    assert sorted(f1) == [2, 4, 6]
    # BestN keeps the highest F1; among equal scores the latest step.
    best = max(sorted(f1), key=lambda s: (f1[s], s))
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == sorted({6, best})
    assert checkpointing.resolve(str(tmp_path))[1] == best


def test_time_limit_stops_with_a_checkpoint_and_the_rerun_finishes(tmp_path):
    config = load_config("default", "tiny")
    config.train.max_steps = 3
    config.train.checkpoint_every = 100
    config.train.time_limit_seconds = 1e-3  # Stops after the first step.
    first = train.train_and_evaluate(config, str(tmp_path))
    assert first == {"summary": None, "step": 1, "finished": False}
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    config.train.time_limit_seconds = None
    second = train.train_and_evaluate(config, str(tmp_path))
    assert second["finished"] and second["step"] == 3


def test_train_step_makes_no_hidden_host_device_transfers():
    """With state and batch on the device, the jitted step must not copy anything implicitly."""
    config = load_config("default", "tiny")
    trainer = train.Trainer(config)
    state = trainer.initial_state()
    rng = np.random.default_rng(0)
    local = {"image": rng.normal(size=(2, 508, 508, 3)).astype(np.float32),
             "label": (rng.random((2, 508, 508)) > 0.5).astype(np.int32),
             "weight": np.ones((2, 508, 508), np.float32)}
    batch = train.global_batch(local, trainer.mesh)  # The one explicit transfer.
    with jax.transfer_guard("disallow"):
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready((state, metrics))
    assert int(jax.device_get(state.step)) == 1


@pytest.mark.parametrize("transpose_impl", ["fast", "xla"])
def test_full_width_train_step_lowers_with_the_analytic_flops(transpose_impl):
    """The paper-sized step traces and lowers (no weights allocated, nothing compiled), and its HLO
    FLOPs are 3x the analytic forward count that the benchmark's TFLOP/s and MFU are built on."""
    import jax.numpy as jnp

    from micronet_jax.models.summary import forward_flops

    config = load_config("glas_508")
    config.model.transpose_impl = transpose_impl
    trainer = train.Trainer(config)
    b = config.train.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, 508, 508, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((b, 508, 508), jnp.int32),
        "weight": jax.ShapeDtypeStruct((b, 508, 508), jnp.float32),
    }
    cost = trainer.train_step.lower(trainer.abstract_state, batch).cost_analysis()
    flops = (cost if isinstance(cost, dict) else cost[0])["flops"]
    ratio = flops / (b * 3 * forward_flops(trainer.model))
    assert 0.99 < ratio < 1.02, ratio
