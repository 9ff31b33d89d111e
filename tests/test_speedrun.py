"""The GlaS speedrun (issue #17): configs/glas_speedrun.py, launch/speedrun.sh and its summary helper.

The full-width config is only traced (jax.eval_shape); the one end-to-end test runs the launcher's
--smoke path (width 1/64, 8 steps, synthetic glands) on the CPU with TensorFlow, tensorflow-datasets,
tensorboardX and matplotlib made unimportable, as on the GPU image. Nothing here reads ../shared.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, load_config

from micronet_jax import core, losses, optim
from micronet_jax.config import base_config
from micronet_jax.tools import speedrun_summary as ss
from micronet_jax.workdir import flatten

SPEEDRUN = REPO / "launch" / "speedrun.sh"
# What the GPU image lacks (docs/gpu_runbook.md, jax_notes.md); the speedrun must not need them.
BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorboardX", "matplotlib")


# ------------------------------------------------------------------------------ aux weighting key


def test_aux_epochs_default_is_the_papers_epoch():
    c = base_config()
    assert c.train.aux_epochs is None
    assert losses.aux_steps_per_epoch(c.train, steps_per_epoch=1062, total_steps=26550) == 1062
    glas = load_config("glas_508")
    assert core.aux_steps_per_epoch(glas) == core.steps_per_epoch(glas) == 1062


def test_aux_epochs_spreads_one_over_epoch_across_the_run():
    c = base_config()
    c.train.aux_epochs = 25
    spe = losses.aux_steps_per_epoch(c.train, steps_per_epoch=1000, total_steps=6000)
    assert spe == 240
    weights = [float(losses.aux_weight(s, spe)) for s in (0, 239, 240, 5999)]
    assert weights == pytest.approx([1.0, 1.0, 0.5, 1 / 25])
    # Steps that do not divide: rounded up, so the weight never falls below 1/N.
    spe = losses.aux_steps_per_epoch(c.train, steps_per_epoch=1, total_steps=610)
    assert float(losses.aux_weight(609, spe)) == pytest.approx(1 / 25)
    assert losses.aux_steps_per_epoch(c.train, steps_per_epoch=1, total_steps=7) == 1
    c.train.aux_epochs = 0
    with pytest.raises(ValueError, match="aux_epochs"):
        losses.aux_steps_per_epoch(c.train, 1, 10)


# ------------------------------------------------------------------------------------ the config


def glas_speedrun_module():
    """configs/glas_speedrun.py as a module (configs are files, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("glas_speedrun", REPO / "configs" / "glas_speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lr(config):
    return optim.learning_rate_schedule(config.train, core.steps_per_epoch(config), core.total_steps(config))


def test_speedrun_config_is_the_fixed_budget_recipe():
    c = load_config("glas_speedrun")
    assert c.model.width == 1.0 and c.model.variant == 508 and c.model.dtype == "bfloat16"
    assert c.train.batch_size == 8 and c.data.source == "glas" and c.data.split_by == "patient"
    steps = core.total_steps(c)
    assert steps * c.train.batch_size == 48_000 and steps == 6000
    assert c.train.warmup_steps == 0 and c.train.schedule == "paper" and c.train.aux_epochs is None
    assert c.train.epochs == 6 and core.steps_per_epoch(c) == 1000
    assert core.aux_steps_per_epoch(c) == 1000  # 1/epoch over the 6 epochs of the run.
    assert c.train.time_limit_seconds == 540 and c.data.num_workers == 8
    assert c.train.eval_every == 0 and c.train.checkpoint_every == steps
    # The paper's lr0*10^(-epoch/5), per epoch, compressed into the 6 epochs of the budget.
    lr = _lr(c)
    for step in (0, 999, 1000, 2500, 5999):
        assert float(lr(step)) == pytest.approx(1e-3 * 10 ** (-(step // 1000) / 5), rel=1e-5)


def test_cosine_alternative_warms_up_and_ends_at_zero():
    c = load_config("glas_speedrun")
    steps = core.total_steps(c)
    glas_speedrun_module().speedrun_cosine_schedule(c, steps)
    assert c.train.warmup_steps == 300 == round(0.05 * steps)
    assert core.aux_steps_per_epoch(c) == 240  # 25 aux epochs over the run.
    lr = _lr(c)
    assert float(lr(0)) == 0.0
    assert float(lr(150)) == pytest.approx(5e-4, rel=1e-6)  # Linear warm-up.
    assert float(lr(300)) == pytest.approx(1e-3, rel=1e-6)  # The paper's lr0 as the peak.
    assert float(lr(3150)) == pytest.approx(5e-4, rel=1e-4)  # Cosine half-way.
    after = [float(lr(s)) for s in range(300, steps + 1, 100)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert float(lr(steps - 1)) < 1e-9 and float(lr(steps)) == pytest.approx(0.0, abs=1e-12)


def test_speedrun_config_traces_at_full_width():
    """The whole train step of the full-width config, traced only: nothing is allocated or compiled."""
    import jax
    import jax.numpy as jnp

    c = load_config("glas_speedrun")
    trainer = core.Trainer(c)
    n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
    assert n_params == 457_038_472
    b, v = c.train.batch_size, c.model.variant
    batch = {"image": jax.ShapeDtypeStruct((b, v, v, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((b, v, v), jnp.int32),
             "weight": jax.ShapeDtypeStruct((b, v, v), jnp.float32)}
    _, metrics = jax.eval_shape(trainer.train_step, trainer.abstract_state, batch)
    assert metrics["aux_weight"].shape == () and metrics["learning_rate"].dtype == jnp.float32


def test_glas_cpu_default_is_the_252_recipe_and_keeps_the_508_one():
    """docs/accuracy.md's fourth-round recipe is the default; the second round's stays as :508."""
    c, old = load_config("glas_cpu"), load_config("glas_cpu", "508")
    for cfg in (c, old):
        core.check_config(cfg, num_devices=1)
    assert (c.model.variant, c.data.crop_size, c.data.scale, c.model.activation) == (252, 252, 0.5, "relu")
    # 21,000 patches (the 45-minute run) and TTA at validation; the 508 recipe stays as measured.
    assert core.total_steps(c) == 10_500 and core.total_steps(old) == 600
    assert c.eval.tta and not old.eval.tta
    assert (old.model.variant, old.data.crop_size) == (508, 508)
    # :contour is the default plus the three-class target and the sixth round's watershed seeds
    # (at the learning rate it was measured with).
    contour = load_config("glas_cpu", "contour")
    core.check_config(contour, num_devices=1)
    assert (contour.data.target, contour.model.num_classes) == ("contour", 3)
    assert (contour.eval.min_marker_size, contour.eval.marker_sigma) == (1000, 4.0)
    assert core.total_steps(contour) == core.total_steps(c) and c.eval.marker_sigma == 0.0
    # The tenth round's frame minimum is on the two-class default only, as measured.
    assert (c.eval.border_min_size, contour.eval.border_min_size, old.eval.border_min_size) == (1000, None, None)
    # The seventeenth round's split of merged glands is on the two-class default only.
    assert (c.eval.split_threshold, c.eval.min_marker_size) == (0.7, 8000)
    assert contour.eval.split_threshold == old.eval.split_threshold == 0.0
    # The eighteenth round's learning rate is on the two-class default only, as measured.
    assert (c.train.learning_rate, contour.train.learning_rate, old.train.learning_rate) == (2e-3, 1e-3, 1e-3)
    with pytest.raises(ValueError, match="':508' or ':contour'"):
        load_config("glas_cpu", "fast")


def test_cpu_variant_differs_from_glas_cpu_only_in_the_schedule():
    base, cpu = load_config("glas_cpu", "508"), load_config("glas_speedrun", "cpu")
    a, b = flatten(base.to_dict()), flatten(cpu.to_dict())
    changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert changed == {"train.schedule": ("paper", "cosine"), "train.warmup_steps": (0, 30),
                       "train.aux_epochs": (None, 25)}
    assert core.total_steps(cpu) == core.total_steps(base) == 600  # Equal budget: 1,200 patches.
    assert core.aux_steps_per_epoch(cpu) == 24 and core.aux_steps_per_epoch(base) == 100
    lr = _lr(cpu)
    assert float(lr(30)) == pytest.approx(cpu.train.learning_rate)
    assert float(lr(600)) == pytest.approx(0.0, abs=1e-12)


def test_smoke_variant_and_bad_argument():
    c = load_config("glas_speedrun", "smoke")
    assert c.platform == "cpu" and c.data.source == "synthetic" and c.model.dtype == "float32"
    assert c.model.width == 1 / 64 and core.total_steps(c) == 8 and c.train.schedule == "paper"
    assert c.train.aux_epochs is None and c.eval.max_images == 2
    with pytest.raises(ValueError, match="smoke"):
        load_config("glas_speedrun", "fast")


# ------------------------------------------------------------------------------- summary helper


def test_budget_flags_limit_and_fit():
    c = load_config("glas_speedrun")
    flags, _ = ss.budget_flags(c, seconds=900)
    assert flags == ["--config.train.time_limit_seconds=540"]  # The config's safety stop.
    flags, _ = ss.budget_flags(c, seconds=300)
    assert flags == ["--config.train.time_limit_seconds=300"]
    flags, notes = ss.budget_flags(c, seconds=5)
    assert flags == ["--config.train.time_limit_seconds=30"] and "raised to 30 s" in notes[0]
    bench = {"train": [{"batch": 8, "dtype": "bfloat16", "remat": False, "steps": 20,
                        "step_s_median": 0.1, "patches_per_s": 80.0, "tflops": 1.0, "mfu": 0.1}]}
    # 300 s: 0.9 x 10 steps/s x (300 - 60) s = 2160 of 6000 steps; the 6 epochs shrink to 360 steps.
    flags, _ = ss.budget_flags(c, seconds=300, bench=bench, fit=True)
    assert flags == ["--config.train.time_limit_seconds=300", "--config.train.max_steps=2160",
                     "--config.train.warmup_steps=0", "--config.train.patches_per_epoch=2880"]
    # Within the config's 540 s safety stop, 0.9 x 10 x 480 = 4320 steps.
    flags, _ = ss.budget_flags(c, seconds=5000, bench=bench, fit=True)
    assert flags[1:] == ["--config.train.max_steps=4320", "--config.train.warmup_steps=0",
                         "--config.train.patches_per_epoch=5760"]
    # The cosine alternative keeps its warm-up fraction instead (5% of the steps).
    cosine = load_config("glas_speedrun")
    glas_speedrun_module().speedrun_cosine_schedule(cosine, 6000)
    flags, _ = ss.budget_flags(cosine, seconds=300, bench=bench, fit=True)
    assert flags[1:] == ["--config.train.max_steps=2160", "--config.train.warmup_steps=108"]
    bench["train"][0]["patches_per_s"] = 200.0  # 22.5 steps/s x 480 s > 6000: never lengthens the run.
    flags, _ = ss.budget_flags(c, seconds=5000, bench=bench, fit=True)
    assert flags == ["--config.train.time_limit_seconds=540"]
    flags, notes = ss.budget_flags(c, seconds=300, bench=None, fit=True)
    assert flags == ["--config.train.time_limit_seconds=300"] and "kept" in notes[-1]


def test_budget_and_tune_flags_command_line(tmp_path, capsys):
    ss.main(["budget", "--config", str(REPO / "configs/glas_speedrun.py"), "--seconds", "200",
             "--config.train.time_limit_seconds=100", "--config.data.root=/x"])
    assert capsys.readouterr().out.split() == ["--config.train.time_limit_seconds=100"]
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"split": "val", "params": {"threshold": 0.4, "fill_holes": True,
                                                          "opening_radius": 2, "min_size": 800,
                                                          "border_min_size": None}}))
    ss.main(["tune-flags", str(best)])
    assert capsys.readouterr().out.split() == [  # an unset border_min_size keeps the default
        "--config.eval.threshold=0.4", "--config.eval.fill_holes=True",
        "--config.eval.opening_radius=2", "--config.eval.min_size=800"]
    with pytest.raises(SystemExit, match="did --mode=tune finish"):
        ss.tune_flags(str(tmp_path / "missing.json"))


def _fake_run(out: Path, workdir: Path, *, evaluate: bool = True) -> None:
    """The files a GPU run's stages write, with made-up figures (a test of the reader, not a result)."""
    (out / "tune").mkdir(parents=True)
    (out / "eval_val_tuned").mkdir()
    (workdir / "eval_val").mkdir(parents=True)
    t0 = 1000.0
    stages = [("machine", 0, 5, "ok"), ("torch", 5, 65, "ok"), ("bench", 65, 125, "ok"),
              ("budget", 125, 126, "ok"), ("train", 126, 486, "ok"), ("tune", 486, 520, "ok")]
    stages.append(("evaluate", 520, 550, "ok" if evaluate else "exit 1"))
    (out / "stages.tsv").write_text("".join(f"{n}\t{t0 + a}\t{t0 + b}\t{s}\n" for n, a, b, s in stages))
    (out / "plan.json").write_text(json.dumps({"mode": "gpu", "config": "configs/glas_speedrun.py",
                                               "overrides": [], "start": t0, "command": "x"}))
    (out / "machine.json").write_text(json.dumps({"platform": "gpu", "device_kind": "Card X",
                                                  "device_count": 1, "jax": "0.11.2"}))
    (out / "bench.json").write_text(json.dumps({"meta": {"peak_tflops": 800}, "train": [{
        "batch": 8, "dtype": "bfloat16", "remat": False, "steps": 20, "step_s_median": 0.08,
        "patches_per_s": 100.0, "tflops": 401.0, "mfu": 0.5, "peak_bytes": 18 * 2**30,
        "peak_source": "device", "peak_is_upper_bound": False, "compile_total_s": 40.0}]}))
    (out / "torch_baseline.jsonl").write_text(
        "warning: some noise\n"
        + json.dumps({"variant": "compiled_bf16", "batch": 8, "img_per_s": 50.0, "peak_gib": 23.8}) + "\n")
    config = load_config("glas_speedrun").to_dict()
    config["train"]["max_steps"] = 4000
    (workdir / "config.json").write_text(json.dumps(config))
    records = [{"step": s, "train/loss": 1.0 / s, "train/patches_per_second": 90.0 if s > 1 else 3.0,
                "train/learning_rate": 1e-4, "train/aux_weight": 0.04} for s in (1, 100, 200, 3000)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = {"split": "val", "step": 3000, "metrics": {"f1": 0.9, "object_dice": 0.88,
                                                        "object_hausdorff": 40.5, "num_images": 17}}
    (workdir / "eval_val" / "report.json").write_text(json.dumps(report))
    (out / "tune" / "best.json").write_text(json.dumps({"params": {"threshold": 0.5, "min_size": 800}}))
    if evaluate:
        report["metrics"] = {"f1": 0.92, "object_dice": 0.89, "object_hausdorff": "inf", "num_images": 17}
        (out / "eval_val_tuned" / "report.json").write_text(json.dumps(report))


def test_summary_reads_the_stage_files(tmp_path):
    out, workdir = tmp_path / "out", tmp_path / "work"
    _fake_run(out, workdir)
    s = ss.summarize(str(out), str(workdir))
    assert s["complete"] and s["failed_stages"] == [] and s["total_minutes"] == pytest.approx(550 / 60)
    assert s["ratio_over_pytorch"] == pytest.approx(2.0)
    assert s["step_benchmark"]["peak_gib"] == pytest.approx(18.0)
    tr = s["training"]
    assert (tr["steps_done"], tr["steps_planned"], tr["finished"]) == (3000, 4000, False)
    assert tr["patches_per_s_end_to_end"] == 90.0 and tr["stage_minutes"] == pytest.approx(6.0)
    assert s["validation"]["tuned_postprocess"]["f1"] == 0.92
    assert s["validation"]["configured_postprocess"]["postprocess"]["min_size"] == 3000
    assert s["targets"] == {"step_over_pytorch_at_least_1.3x": "met", "peak_memory_at_most_20_gib": "met",
                            "validation_f1_at_least_paper_test_a_0.913": "met",
                            "whole_command_within_10_minutes": "met"}
    assert json.loads((out / "summary.json").read_text())["ratio_over_pytorch"] == pytest.approx(2.0)
    md = (out / "summary.md").read_text()
    for text in ("Card X", "100 patches/s", "MFU 50% of 800", "18.00 GiB", "2.00x", "50 patches/s",
                 "3,000 of 4,000 steps", "stopped early (time limit)", "| 0.920 | 0.890 | +inf |",
                 "threshold 0.5, min_size 800", "17 held-out", "9.17 min"):
        assert text in md, text
    assert (out / "metrics.jsonl").is_file() and (out / "config.json").is_file()


def test_summary_of_a_failed_run_says_what_is_missing(tmp_path):
    out, workdir = tmp_path / "out", tmp_path / "work"
    _fake_run(out, workdir, evaluate=False)
    (out / "bench.json").unlink()
    (out / "torch_baseline.jsonl").write_text(json.dumps({"variant": "compiled_bf16", "error": "OOM"}))
    s = ss.summarize(str(out), str(workdir))
    assert not s["complete"] and s["failed_stages"] == ["evaluate"]
    assert s["step_benchmark"] is None and s["ratio_over_pytorch"] is None
    assert s["targets"]["peak_memory_at_most_20_gib"] == "not measured"
    assert s["targets"]["validation_f1_at_least_paper_test_a_0.913"] == "not measured"
    md = (out / "summary.md").read_text()
    assert "| bare train step | not measured |" in md and "PyTorch peer | failed: OOM" in md
    assert "Failed: evaluate" in md and "| tuned on this split | not measured |" in md


def test_paper_figure_matches_the_evaluation_table():
    from micronet_jax.evaluate import PAPER_RESULTS

    assert ss.PAPER_TEST_A_F1 == PAPER_RESULTS["testA"]["f1"]


# ------------------------------------------------------------------------------- what it imports


def _blocker(folder: Path) -> Path:
    """A sitecustomize that hides BLOCKED from every Python started with it on PYTHONPATH.

    Every import finder answers "not found" (None) for them, exactly as when they are not installed,
    so ``importlib.util.find_spec`` probes (JAX, etils, orbax) see no module rather than an error.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import sys

        class _Hide:
            def __init__(self, finder):
                self._finder = finder

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    return None
                return self._finder.find_spec(name, path, target)

            def __getattr__(self, attr):
                return getattr(self._finder, attr)

        sys.meta_path[:] = [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
        """))
    return folder


def test_speedrun_modules_import_without_tensorflow():
    code = textwrap.dedent(f"""\
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # import raises ImportError
        import micronet_jax.main, micronet_jax.train, micronet_jax.evaluate, micronet_jax.benchmark
        import micronet_jax.data, micronet_jax.data.pipeline, micronet_jax.tools.speedrun_summary
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m])
        assert not loaded, loaded
        print("ok")
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------------------ the launcher


def _launch(*args: str, tmp_path: Path, env: dict | None = None, timeout: float = 60):
    full_env = {**os.environ, "PYTHON": sys.executable, "HOME": str(tmp_path), **(env or {})}
    return subprocess.run(["bash", str(SPEEDRUN), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _glas_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(1, n + 1):
        (folder / f"train_{i}.png").write_bytes(b"")
        (folder / f"train_{i}_anno.png").write_bytes(b"")
    return folder


def test_dry_run_prints_every_stage_and_runs_nothing(tmp_path):
    data = _glas_folder(tmp_path / "glas", 85)
    peer = tmp_path / "torch_baseline.py"
    peer.write_text("raise SystemExit('must not run')\n")
    proc = _launch(f"--data-root={data}", "--out=o", "--workdir=w", "--torch", "--fit", "--dry-run",
                   "--config.train.batch_size=16", tmp_path=tmp_path, env={"TORCH_BASELINE": str(peer)})
    assert proc.returncode == 0, proc.stderr
    assert "dry run: nothing was started" in proc.stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert commands[0] == "nvidia-smi"
    joined = "\n".join(commands)
    order = ["speedrun_summary machine", f"{peer} 16 10 compiled_bf16", "micronet_jax.benchmark",
             "speedrun_summary budget", "--mode=train", "--mode=tune", "tune-flags", "--mode=evaluate",
             "speedrun_summary summarize"]
    positions = [joined.find(k) for k in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions))
    peer.unlink()  # Without the peer (users have no ../shared), the stage is skipped with a note.
    proc = _launch(f"--data-root={data}", "--torch", "--dry-run", tmp_path=tmp_path,
                   env={"TORCH_BASELINE": str(peer)})
    assert proc.returncode == 0 and f"(torch: skipped, {peer} not found)" in proc.stdout
    bench = next(c for c in commands if "micronet_jax.benchmark" in c)
    assert "--set platform=gpu" in bench and "--set train.batch_size=16" in bench
    assert "--steps 20 --skip-inference" in bench and f"--json {tmp_path}/o/bench.json" in bench
    trainer = next(c for c in commands if "--mode=train" in c)
    assert f"--config={REPO}/configs/glas_speedrun.py" in trainer and "--config.platform=gpu" in trainer
    assert f"--config.data.root={data}" in trainer and "--config.train.batch_size=16" in trainer
    evaluate = next(c for c in commands if "--mode=evaluate" in c)
    assert "--config.eval.split=val" in evaluate and f"--output={tmp_path}/o/eval_val_tuned" in evaluate
    assert "--fit" in next(c for c in commands if "speedrun_summary budget" in c)


def test_smoke_dry_run_and_help(tmp_path):
    proc = _launch("--smoke", "--dry-run", "--out=o", "--peak-tflops=989", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    trainer = next(c for c in commands if "--mode=train" in c)
    assert f"--config={REPO}/configs/glas_speedrun.py:smoke" in trainer
    assert "platform=gpu" not in proc.stdout and "data.root" not in trainer
    assert "--steps 2 --skip-inference" in next(c for c in commands if "micronet_jax.benchmark" in c)
    assert "--peak-tflops 989" in proc.stdout and "synthetic glands" in proc.stdout
    assert not (tmp_path / "o").exists()
    proc = _launch("--help", tmp_path=tmp_path)
    assert proc.returncode == 0 and "GlaS speedrun on one GPU" in proc.stdout and "--fit" in proc.stdout


def test_launcher_names_what_is_wrong(tmp_path):
    proc = _launch("--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 2 and "give --data-root=DIR" in proc.stderr and "stage_glas.sh" in proc.stderr
    proc = _launch("--data-root=/no/such/glas", "--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 2 and "no such folder: /no/such/glas" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _launch(f"--data-root={empty}", "--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 2 and f"{empty} holds no GlaS training pairs" in proc.stderr
    half = _glas_folder(tmp_path / "half", 42)
    proc = _launch(f"--config.data.root={half}", "--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 0 and "holds 42 GlaS training masks, not the 85" in proc.stdout
    proc = _launch(f"--data-root={half}", "--out=o", "--workdir=o/w", "--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--workdir must not be inside --out" in proc.stderr
    proc = _launch("--smoke", "--frobnicate", tmp_path=tmp_path)
    assert proc.returncode == 2 and "unknown argument '--frobnicate'" in proc.stderr
    proc = _launch("--smoke", "--config=configs/nope.py", "--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 2 and "config file not found" in proc.stderr


@pytest.mark.slow
def test_smoke_runs_every_stage_and_writes_the_summary(tmp_path):
    out, workdir = tmp_path / "out", tmp_path / "work"
    env = {"PYTHONPATH": str(_blocker(tmp_path / "block"))}
    proc = _launch("--smoke", "--torch", f"--out={out}", f"--workdir={workdir}", tmp_path=tmp_path,
                   env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["mode"] == "smoke" and s["complete"] and s["failed_stages"] == []
    assert [st["name"] for st in s["stages"]] == ["machine", "torch", "bench", "budget", "train", "tune",
                                                  "evaluate"]
    assert {st["name"]: st["status"] for st in s["stages"]}["torch"] == "skipped"
    assert s["machine"]["platform"] == "cpu"
    assert s["step_benchmark"]["patches_per_s"] > 0 and s["step_benchmark"]["steps"] == 2
    tr = s["training"]
    assert (tr["steps_done"], tr["steps_planned"], tr["finished"]) == (8, 8, True)
    assert tr["schedule"] == "paper" and tr["aux_epochs"] is None
    val = s["validation"]
    for key in ("configured_postprocess", "tuned_postprocess"):
        assert 0.0 <= val[key]["f1"] <= 1.0 and val[key]["n_images"] == 2
    assert val["tuned_postprocess"]["postprocess"] == json.loads((out / "tune/best.json").read_text())["params"]
    assert set(s["targets"].values()) == {"not applicable (--smoke)"}
    md = (out / "summary.md").read_text()
    assert "--smoke: reduced width" in md and "8 of 8 steps (16 patches), finished" in md
    # The logged schedule is the speedrun's: two epochs of 4 steps, lr0 then lr0*10^(-1/5), aux 1 then 1/2.
    config = load_config("glas_speedrun", "smoke")
    lr = _lr(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "train/loss" in r}
    assert sorted(logged) == list(range(1, 9))
    for step, r in logged.items():
        assert r["train/learning_rate"] == pytest.approx(float(lr(step - 1)), rel=1e-5, abs=1e-12)
        assert r["train/aux_weight"] == pytest.approx(1 / ((step - 1) // 4 + 1))
    assert logged[1]["train/learning_rate"] == pytest.approx(1e-3, rel=1e-6)
    assert logged[8]["train/learning_rate"] == pytest.approx(1e-3 * 10 ** -0.2, rel=1e-5)
    # Small enough to copy back, and no checkpoint in it.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    assert not [p for p in out.rglob("*") if "checkpoint" in p.name]
    assert (workdir / "checkpoints").is_dir()
    assert math.isfinite(tr["final_loss"])
