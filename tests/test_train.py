"""The training loop as users run it: resume after SIGKILL, sharding, NaN handling, clear errors."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TINY, load_config, restored_params, run_main

from micronet_jax import checkpointing, core, train
from micronet_jax.data import DataError
from micronet_jax.models import build_model
from micronet_jax.models.summary import abstract_variables

def final_params(workdir, config):
    return restored_params(workdir, config)


def final_variables(workdir, config):
    """Parameters and BatchNorm statistics, as evaluation restores them."""
    model = build_model(config.model)
    variables, step = checkpointing.restore_variables(
        str(workdir), config.model, abstract_variables(model)
    )
    return jax.device_get(variables), step


def straight_and_resumed(config, tmp_path):
    """Trains ``config`` straight through, and again stopped after step 1 and resumed; returns each
    run's final ``(variables, step)`` as evaluation restores them."""
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    config.train.time_limit_seconds = 1e-3
    assert train.train_and_evaluate(config, str(tmp_path / "resumed"))["step"] == 1
    config.train.time_limit_seconds = None
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    return final_variables(tmp_path / "straight", config), final_variables(tmp_path / "resumed", config)


@pytest.fixture(scope="module")
def two_steps_in_process(tmp_path_factory):
    """Two tiny steps by the in-process trainer: the bitwise reference of the in-process tests (the
    subprocess ``uninterrupted`` run is the reference of the command-line ones)."""
    workdir = tmp_path_factory.mktemp("two_steps")
    config = load_config("default", "tiny")
    config.train.max_steps = 2
    train.train_and_evaluate(config, str(workdir))
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


def kill_during_the_step_4_save(workdir):
    """Starts the 6-step run and SIGKILLs it as soon as the step-4 save is in flight; returns the pid,
    or None when the save had already committed by the time the kill landed."""
    cmd = [sys.executable, "-m", "micronet_jax.main", *TINY, f"--workdir={workdir}",
           "--config.train.max_steps=6"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            names = os.listdir(ckpts) if ckpts.exists() else []
            if "2" in names and any(n.startswith("4") for n in names):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    names = os.listdir(ckpts)
    in_flight = "4" not in names and any(n.startswith("4.") for n in names)
    return proc.pid if in_flight else None


def test_resume_after_sigkill_during_a_save_is_bitwise_identical(uninterrupted, tmp_path):
    """Kill the run while it writes the step-4 checkpoint, restart it, and get exactly the same params."""
    config = load_config("default", "tiny")
    for attempt in range(4):  # The save takes a fraction of a second: retry until the kill lands in it.
        workdir = tmp_path / f"killed{attempt}"
        pid = kill_during_the_step_4_save(workdir)
        if pid is not None:
            break
    else:
        pytest.fail("the kill never landed during the step-4 save in 4 attempts")
    manager = checkpointing.make_manager(str(workdir / "checkpoints"), read_only=True)
    assert manager.latest_step() == 2  # The half-written step 4 is not a checkpoint.
    manager.close()

    proc = run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6")
    # The killed run's lock is stale (its process is gone) and is taken over, naming it.
    assert f"taking over the lock of workdir {workdir}" in proc.stderr and f"pid {pid}," in proc.stderr
    assert "resumed from step 2" in proc.stderr
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
    reference, _ = final_params(uninterrupted, config)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(two_steps_in_process, tmp_path,
                                                              monkeypatch):
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
    # Intact: the step-2 checkpoint is exactly an unpoisoned run's step 2.
    reference, ref_step = final_params(two_steps_in_process / "checkpoints" / "2", config)
    assert ref_step == 2
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_one_step_on_8_devices_equals_1_device(tmp_path):
    """Runs in a subprocess: the simulated device count is fixed when JAX starts."""
    script = r"""
import jax, numpy as np, chex, sys
sys.path.insert(0, "tests")
from conftest import load_config
from micronet_jax import core
assert jax.device_count() == 8, jax.devices()
config = load_config("default", "tiny")
config.train.batch_size = 8
rng = np.random.default_rng(0)
batch = {"image": rng.normal(size=(8, 508, 508, 3)).astype(np.float32),
         "label": (rng.random((8, 508, 508)) > 0.5).astype(np.int32),
         "weight": rng.random((8, 508, 508)).astype(np.float32)}
results = []
for devices in (jax.devices(), jax.devices()[:1]):
    t = core.Trainer(config, devices=devices)
    state = t.initial_state()
    state, metrics = t.train_step(state, core.global_batch(batch, t.mesh))
    results.append((jax.device_get(state.params), float(metrics["loss"]), float(metrics["grad_norm"])))
# Adam is blind to the gradient's scale, so check that on the gradient norm itself.
assert abs(results[0][1] - results[1][1]) < 1e-5, results
assert abs(results[0][2] - results[1][2]) < 1e-5 * results[1][2], results
# Adam's first update is lr * g / (|g| + eps), about +-lr (1e-3) per element: a gradient pointing
# elsewhere moves elements by up to 2e-3. The summation order of the 8-way reduction can still
# move the update of a near-zero gradient by a small fraction of lr, hence atol 1e-5 (1% of lr).
chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
# Tiled inference splits an even tile batch over the 8 devices and runs an uneven one on one device:
# both give the single-device logits.
model = t.model
variables = jax.device_get(state.variables())
tiles = batch["image"][:, :model.variant, :model.variant]
sharded = core.make_forward_fn(model, variables)
single = jax.jit(lambda v, x: model.apply(v, x, train=False)["main"])
for n in (8, 3):
    want = np.asarray(single(variables, tiles[:n]))
    np.testing.assert_allclose(sharded(tiles[:n]), want, rtol=1e-5, atol=1e-5)
config.train.batch_size = 4
try:
    core.Trainer(config)
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


def test_two_cpu_devices_train_the_default_to_the_same_loss_curve(tmp_path):
    """The CPU configs split the batch over two CPU devices (config.cpu_devices=2, issue #18); the run
    must be the one-device run up to float summation order, step for step."""
    curves = {}
    for devices in (1, 2):
        wd = tmp_path / f"devices_{devices}"
        proc = run_main(*TINY, f"--workdir={wd}", "--config.train.max_steps=4",
                        "--config.train.eval_every=0", f"--config.cpu_devices={devices}")
        assert f"devices: {devices} (cpu)" in proc.stderr, proc.stderr[-2000:]
        records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
        curves[devices] = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(curves[1]) == 4, curves
    np.testing.assert_allclose(curves[2], curves[1], rtol=1e-4)


def test_cpu_devices_must_divide_the_batch_and_the_message_says_how(tmp_path):
    proc = run_main(*TINY, f"--workdir={tmp_path}", "--config.train.batch_size=1",
                    "--config.train.max_steps=1", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.batch_size=1" in proc.stderr and "--config.cpu_devices=1" in proc.stderr
    assert "Traceback" not in proc.stderr


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
        core.Trainer(config)


def test_paper_schedule_and_aux_weight():
    from micronet_jax import losses, optim

    config = load_config("glas_508")
    schedule = optim.learning_rate_schedule(config.train, steps_per_epoch=10, total_steps=250)
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, 9, 10, 50, 249)],
        [1e-3, 1e-3, 1e-3 * 10 ** -0.2, 1e-4, 1e-3 * 10 ** (-24 / 5)], rtol=1e-5,
    )
    np.testing.assert_allclose(
        [float(losses.aux_weight(s, 10)) for s in (0, 9, 10, 25)], [1, 1, 0.5, 1 / 3], rtol=1e-6
    )
    assert float(losses.aux_weight(0, 10, enabled=False)) == 0.0


def test_logged_learning_rate_and_aux_weight_follow_the_paper_schedule(uninterrupted):
    """metrics.jsonl of the real run: record s is step s-1's update (4 steps per epoch in :tiny)."""
    records = [json.loads(line) for line in open(uninterrupted / "metrics.jsonl")]
    logged = {r["step"]: (r["train/learning_rate"], r["train/aux_weight"]) for r in records
              if "train/learning_rate" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    epoch2 = 1e-3 * 10 ** -0.2  # lr0 * 10^(-epoch/5), epoch 1 (counted from 0)
    want = {1: (1e-3, 1.0), 2: (1e-3, 1.0), 3: (1e-3, 1.0), 4: (1e-3, 1.0),
            5: (epoch2, 0.5), 6: (epoch2, 0.5)}
    for s, (lr, aux) in want.items():
        np.testing.assert_allclose(logged[s], (lr, aux), rtol=1e-6, err_msg=f"step {s}")


def test_loss_equals_a_hand_computation():
    from micronet_jax import losses

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (2, 3, 4))
    weights = rng.uniform(0.5, 10, (2, 3, 4)).astype(np.float32)
    outputs = {k: rng.normal(size=(2, 3, 4, 2)).astype(np.float32)
               for k in ("main", "aux1", "aux2", "aux3")}

    def by_hand(logits):
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
        return float((weights * nll).sum() / nll.size)

    parts = {k: by_hand(v) for k, v in outputs.items()}
    total, got = losses.micronet_loss(outputs, labels, weights, np.float32(1 / 3))
    for k in outputs:
        np.testing.assert_allclose(float(got[f"loss_{k}"]), parts[k], rtol=1e-6)
    np.testing.assert_allclose(
        float(total), parts["main"] + (parts["aux1"] + parts["aux2"] + parts["aux3"]) / 3, rtol=1e-6)
    # Equal logits give log 2 per pixel, times the weight.
    flat = losses.weighted_cross_entropy(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2), int),
                                         np.full((1, 2, 2), 3.0))
    np.testing.assert_allclose(float(flat), 3 * np.log(2), rtol=1e-6)


def test_batch_norm_and_warmup_cosine_schedule_through_a_resume(tmp_path):
    """BatchNorm's running statistics are state too: stop after step 1, resume, and end exactly where
    a straight run ends, statistics included. The same runs (one compile) check the trainer's wiring
    of a linear warm-up into a cosine decay, per logged step."""
    config = load_config("default", "tiny")
    config.model.batch_norm = True
    config.train.schedule = "cosine"
    config.train.warmup_steps = 2
    config.train.max_steps = 4
    config.train.checkpoint_every = 100
    (straight, s1), (resumed, s2) = straight_and_resumed(config, tmp_path)
    assert s1 == s2 == 4 and set(straight) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    # The statistics moved away from their initial values, so equality above is not trivial.
    initial = jax.device_get(core.Trainer(config).initial_state().batch_stats)
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), straight["batch_stats"], initial)
    assert all(jax.tree.leaves(moved))

    # Record s is the update of step s-1: warm-up 0 -> lr0 over 2 steps, then a cosine over the
    # remaining 2. The optimizer applies that same rate: the first update (lr 0) is exactly zero.
    for run in ("straight", "resumed"):
        records = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        logged = {r["step"]: r for r in records if "train/learning_rate" in r}
        assert sorted(logged) == [1, 2, 3, 4]
        lrs = [logged[s]["train/learning_rate"] for s in (1, 2, 3, 4)]
        cosine = [0.5 * 1e-3 * (1 + np.cos(np.pi * k / 2)) for k in range(2)]
        np.testing.assert_allclose(lrs, [0.0, 0.5e-3, *cosine], rtol=1e-6, atol=1e-12, err_msg=run)
        updates = [logged[s]["train/update_norm"] for s in (1, 2, 3, 4)]
        assert updates[0] == 0.0 and all(u > 0 for u in updates[1:]), (run, updates)


def test_keeps_latest_and_best_validated_checkpoint(tmp_path, monkeypatch):
    """Three validations with distinct F1s, the best in the middle: BestN must keep step 4 beside
    the latest (6) and drop step 2, and evaluation of the workdir must pick step 4."""
    from micronet_jax import evaluate

    real = evaluate.evaluate_examples
    forced = iter([0.5, 0.9, 0.3])  # The tiny model's own F1s are often all equal.

    def with_forced_f1(*args, **kwargs):
        result = real(*args, **kwargs)
        result["summary"] = dict(result["summary"], f1=next(forced))
        return result

    monkeypatch.setattr(evaluate, "evaluate_examples", with_forced_f1)
    config = load_config("default", "tiny")
    config.train.max_steps = 6
    config.train.eval_every = 2
    config.train.checkpoint_every = 100
    config.train.keep_checkpoints = 1
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {r["step"]: r["val/f1"] for r in records if "val/f1" in r} == {2: 0.5, 4: 0.9, 6: 0.3}
    kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert kept == [4, 6]
    assert checkpointing.resolve(str(tmp_path))[1] == 4


def test_time_limit_stops_with_a_checkpoint_and_the_rerun_resumes(two_steps_in_process, tmp_path,
                                                                  caplog):
    config = load_config("default", "tiny")
    config.train.max_steps = 2
    config.train.checkpoint_every = 100
    config.train.time_limit_seconds = 1e-3  # Stops after the first step.
    first = train.train_and_evaluate(config, str(tmp_path))
    assert first == {"summary": None, "step": 1, "finished": False, "stopped_by": "time limit"}
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    config.train.time_limit_seconds = None
    with caplog.at_level("INFO", logger="micronet_jax"):
        second = train.train_and_evaluate(config, str(tmp_path))
    assert second["finished"] and second["step"] == 2
    # It resumed (a restart from scratch would also end at step 2) and equals a straight run.
    assert "resumed from step 1" in caplog.text
    params, _ = final_params(tmp_path, config)
    reference, _ = final_params(two_steps_in_process, config)
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_train_step_makes_no_hidden_host_device_transfers():
    """With state and batch on the device, the jitted step must not copy anything implicitly."""
    config = load_config("default", "tiny")
    trainer = core.Trainer(config)
    state = trainer.initial_state()
    rng = np.random.default_rng(0)
    local = {"image": rng.normal(size=(2, 508, 508, 3)).astype(np.float32),
             "label": (rng.random((2, 508, 508)) > 0.5).astype(np.int32),
             "weight": np.ones((2, 508, 508), np.float32)}
    batch = core.global_batch(local, trainer.mesh)  # The one explicit transfer.
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
    trainer = core.Trainer(config)
    b = config.train.batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, 508, 508, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((b, 508, 508), jnp.int32),
        "weight": jax.ShapeDtypeStruct((b, 508, 508), jnp.float32),
    }
    cost = trainer.train_step.lower(trainer.abstract_state, batch).cost_analysis()
    flops = (cost if isinstance(cost, dict) else cost[0])["flops"]
    ratio = flops / (b * 3 * forward_flops(trainer.model))
    if transpose_impl == "xla":
        assert 0.99 < ratio < 1.02, ratio
    else:
        # The fast 5x5 stride-1 transposed convs pad their input with jnp.pad (a VALID conv, for a fast
        # CPU kernel gradient), so the HLO also counts the multiplications by the zero border, which
        # the analytic input-pixel count leaves out: 1.055 here, and the work is real on every backend.
        assert 1.03 < ratio < 1.08, ratio


def test_weight_average_is_the_ema_of_the_trained_weights_and_survives_a_resume(tmp_path):
    """train.ema_decay: the step keeps d * ema + (1 - d) * weights without changing the weights it
    trains; checkpoints hold the average for inference and the trained weights for resuming, so a
    run stopped after step 1 and resumed ends with the straight run's average, bit for bit."""
    from micronet_jax import benchmark

    config = load_config("default", "tiny")
    config.train.ema_decay = 0.5
    config.train.max_steps = 3
    config.train.checkpoint_every = 100
    trainer = core.Trainer(config)
    plain = core.Trainer(load_config("default", "tiny"))
    batch = core.global_batch(
        jax.device_get(benchmark.synthetic_batch(trainer, int(config.train.batch_size))), trainer.mesh)
    state, reference = trainer.initial_state(), plain.initial_state()
    expected = jax.device_get(state.variables())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema), expected)
    for _ in range(2):
        state, _ = trainer.train_step(state, batch)
        reference, _ = plain.train_step(reference, batch)
        weights = jax.device_get(state.variables())
        expected = jax.tree.map(lambda e, w: 0.5 * e + 0.5 * w, expected, weights)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     jax.device_get(state.ema), expected)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     weights, jax.device_get(reference.variables()))
    # The average differs from the weights, so what the checkpoint holds below is not a tautology.
    assert not np.array_equal(*(jax.tree.leaves(t)[0] for t in (expected, weights)))

    (straight, s1), (resumed, s2) = straight_and_resumed(config, tmp_path)
    assert s1 == s2 == 3
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
    restored = checkpointing.restore_state(str(tmp_path / "straight" / "checkpoints"), 3,
                                           trainer.restore_target())
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.ema), straight)
    assert not np.array_equal(jax.tree.leaves(restored.params)[0], jax.tree.leaves(straight)[0])
    # --config.eval.weights=trained scores the run's own last-step weights instead of the average.
    trained, _ = checkpointing.restore_variables(
        str(tmp_path / "straight"), config.model, abstract_variables(build_model(config.model)),
        weights="trained")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained["params"]),
                 jax.device_get(restored.params))


def test_trained_weights_without_an_average_are_the_params_and_weights_only_average_is_refused(
        two_steps_in_process, tmp_path):
    """eval.weights=trained reads a plain run's params (its last step's weights); a weights-only
    checkpoint of an averaged run (the ablation runner's seeds) lacks them and says so by folder."""
    config = load_config("default", "tiny")
    target = abstract_variables(build_model(config.model))
    inference, step = checkpointing.restore_variables(str(two_steps_in_process), config.model, target)
    trained, _ = checkpointing.restore_variables(str(two_steps_in_process), config.model, target,
                                                 weights="trained")
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained), jax.device_get(inference))
    with pytest.raises(ValueError, match=r"eval\.weights='last' must be one of inference, trained"):
        checkpointing.restore_variables(str(two_steps_in_process), config.model, target, weights="last")

    config.train.ema_decay = 0.9
    manager = checkpointing.make_manager(str(tmp_path))
    checkpointing.save_weights(manager, 5, jax.device_get(inference), config=config)
    manager.wait_until_finished()
    manager.close()
    checkpointing.restore_variables(str(tmp_path), config.model, target)  # The average: readable.
    with pytest.raises(ValueError, match=r"checkpoint folder .*/5 holds only the average of the "
                                         r"weights \(trained with train\.ema_decay=0\.9"):
        checkpointing.restore_variables(str(tmp_path), config.model, target, weights="trained")


def test_weight_average_decay_and_switching_it_on_a_resume_are_refused_clearly():
    from micronet_jax import workdir as workdir_lib

    config = load_config("default", "tiny")
    config.train.ema_decay = 1.0
    with pytest.raises(ValueError, match=r"train\.ema_decay=1\.0 must be in \[0, 1\)"):
        core.check_config(config, num_devices=1)
    saved = {"train": {"optimizer": "adam", "ema_decay": 0.0}}
    refused, _ = workdir_lib.resume_changes(saved, {"train": {"optimizer": "adam", "ema_decay": 0.999}})
    assert refused == ["train.ema_decay: saved 0.0, given 0.999"]
    on = {"train": {"optimizer": "adam", "ema_decay": 0.999}}
    refused, allowed = workdir_lib.resume_changes(on, {"train": {"optimizer": "adam", "ema_decay": 0.99}})
    assert refused == [] and allowed == ["train.ema_decay: saved 0.999, given 0.99"]
    # A workdir from before the key existed trained without an average.
    refused, _ = workdir_lib.resume_changes({"train": {"optimizer": "adam"}}, on)
    assert refused == ["train.ema_decay: saved 0.0, given 0.999"]
