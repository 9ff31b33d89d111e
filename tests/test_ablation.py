"""Ablation sweeps: reports and resume of a tiny CPU sweep, and vmapped seeds == seeds trained alone.

Compile budget: the sweep uses baseline and no_weight_map, which differ only in the data pipeline, so
both train (and evaluate) with one compiled init, one vmapped step and one forward; the equivalence
test then reuses those (same config, same process) and adds only the plain single-seed step.
"""

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax import ablation, multiseed, reporting, train
from micronet_jax.data.pipeline import make_train_dataset

# Width 1/64 on 3 small synthetic images; 2 steps of batch 2 per seed.
TINY = {
    "model.width": 1 / 64,
    "data.synthetic_num_train": 3,
    "data.synthetic_num_val": 1,
    "data.synthetic_height": 300,
    "data.synthetic_width": 330,
    "data.patch_size": 520,
    "eval.tile_batch": 1,
    "eval.min_size": 20,
    "eval.num_overlays": 0,
}
STEPS = 2
SEEDS = (0, 1)
# Two trained variants with one compiled program, and one eval-only variant on the baseline's weights.
VARIANTS = ["baseline", "no_weight_map", "pp_min100"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablation")
    rows = ablation.run_sweep(workdir, sweep="cpu", variants=VARIANTS,
                              seeds=SEEDS, overrides=TINY, steps=STEPS)
    return workdir, rows


def test_sweep_writes_reports_and_rerun_skips_finished_runs(sweep):
    workdir, rows = sweep
    assert [(r["variant"], r["seed"], r["status"]) for r in rows] == [
        ("baseline", 0, "ran"), ("baseline", 1, "ran"),
        ("no_weight_map", 0, "ran"), ("no_weight_map", 1, "ran"),
        ("pp_min100", 0, "ran"), ("pp_min100", 1, "ran"),
    ]
    with open(workdir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6
    assert set(reporting.CSV_COLUMNS) == set(table[0])
    for row in table:
        assert int(row["steps"]) == STEPS
        assert np.isfinite(float(row["final_train_loss"]))
        assert row["trained_with"] == "vmap x2"
    # The table's metrics are those of the saved weights: evaluate baseline seed 0 again.
    config = ablation.load_ablation_module().variant_config("baseline", "cpu", TINY)
    again = ablation.evaluate_variables(
        config, ablation.restore_variables(ablation.run_dir(workdir, "baseline", 0), config),
        train.validation_examples(config))["summary"]
    row0 = next(r for r in table if r["variant"] == "baseline" and int(r["seed"]) == 0)
    for key in ("f1", "pixel_dice"):
        assert float(row0[key]) == pytest.approx(float(again[key]), rel=1e-6), key
    md = (workdir / "results.md").read_text()
    assert "| baseline | 2 |" in md and "| no_weight_map | 2 |" in md and "±" in md
    assert "reuse the baseline weights" in md
    # The eval-only variant was not trained: it reports the baseline's training and weights.
    by = {(r["variant"], r["seed"]): r for r in rows}
    for s in SEEDS:
        assert by[("pp_min100", s)]["weights_from"] == "baseline" and by[("pp_min100", s)]["eval_only"]
        assert by[("pp_min100", s)]["final_train_loss"] == by[("baseline", s)]["final_train_loss"]
    assert not ablation.run_dir(workdir, "pp_min100", 0).joinpath("checkpoints").exists()
    assert (workdir / "results.png").stat().st_size > 5000
    for v in ("baseline", "no_weight_map"):
        for s in SEEDS:
            d = ablation.run_dir(workdir, v, s)
            assert (d / "result.json").exists() and (d / "checkpoints").is_dir()
    # The two data streams of one variant differ, so its seeds are really different runs.
    r0, r1 = (json.loads((ablation.run_dir(workdir, "baseline", s) / "train.json").read_text())
              for s in SEEDS)
    assert r0["losses"] != r1["losses"]

    # A rerun trains and evaluates nothing: every run is read back, and the reports are rewritten.
    (workdir / "results.csv").unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ablation, "train_seeds", must_not_run)
        patch.setattr(ablation, "evaluate_variables", must_not_run)
        again = ablation.run_sweep(workdir, sweep="cpu", variants=VARIANTS,
                                   seeds=SEEDS, overrides=TINY, steps=STEPS)
    assert {r["status"] for r in again} == {"skipped"}
    assert [r["f1"] for r in again] == [r["f1"] for r in rows]
    assert (workdir / "results.csv").exists()

    # Asking the same workdir for a different config is refused instead of mixing results.
    with pytest.raises(ValueError, match="different config"):
        ablation.run_sweep(workdir, sweep="cpu", variants=["baseline"], seeds=SEEDS,
                           overrides=TINY, steps=STEPS + 1, write_outputs=False)


def test_vmapped_seeds_match_seeds_trained_alone(sweep):
    """Two steps of jit(vmap(step)) over seeds [0, 1] == two steps of jit(step) per seed."""
    config = ablation.load_ablation_module().variant_config(
        "baseline", "cpu", {**TINY, "train.max_steps": STEPS})
    vmapped, records = multiseed.train_seeds(config, SEEDS, vmap_seeds=True)

    # The reference: the trainer's pure pieces, one seed at a time, each seed's own data stream.
    setup = multiseed.programs_for(config).setup
    step = jax.jit(setup.step_fn)
    init = jax.jit(setup.init_fn)
    source = multiseed._train_source(config)
    alone = []
    for seed in SEEDS:
        state = init(jnp.int32(seed))
        batches = iter(make_train_dataset(source, config.data, global_batch_size=2, seed=seed,
                                          crop_size=508))
        for _ in range(STEPS):
            state, metrics = step(state, next(batches))
        alone.append(jax.device_get(state.inference_variables()))
        np.testing.assert_allclose(float(metrics["loss"]), records[SEEDS.index(seed)].losses[-1],
                                   rtol=1e-4)

    for seed in SEEDS:
        chex.assert_trees_all_close(vmapped[seed], alone[seed], rtol=1e-4, atol=1e-5)
    # Different seeds give different models (the seed axis is not broadcast by mistake).
    a = jax.tree.leaves(vmapped[0]["params"])
    b = jax.tree.leaves(vmapped[1]["params"])
    assert any(not np.allclose(x, y) for x, y in zip(a, b))
    # The init with a traced seed builds exactly the trainer's initial state for that seed.
    traced = jax.device_get(init(jnp.int32(1)).params)
    constant = jax.device_get(jax.jit(functools.partial(setup.init_fn, 1))().params)
    jax.tree.map(np.testing.assert_array_equal, traced, constant)
    # And the sweep's saved weights of seed 0 are the ones this training reproduces.
    saved = ablation.restore_variables(ablation.run_dir(sweep[0], "baseline", 0), config)
    chex.assert_trees_all_close(saved["params"], vmapped[0]["params"], rtol=1e-5, atol=1e-6)


# Run in a fresh process with two CPU devices, whatever this process has: the seed mesh then puts
# one seed on each device, the layout the CPU configs (cpu_devices=2) give a sweep.
TWO_DEVICE_CHECK = """
import json, sys
import chex, jax, jax.numpy as jnp, numpy as np
from micronet_jax import ablation, multiseed
assert len(jax.devices()) == 2, jax.devices()
# The smallest case first: one 1x1 conv per seed, as the up blocks' fuse convs and the heads.
def conv1x1(kernel, x):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
rng = np.random.default_rng(0)
kernel = rng.standard_normal((2, 1, 1, 16, 8), dtype=np.float32)
x = rng.standard_normal((2, 2, 8, 8, 16), dtype=np.float32)
mesh = multiseed.seed_mesh(2)
out = jax.jit(multiseed.seeds_per_device(lambda k, x: (k, conv1x1(k, x)), mesh))(kernel, x)[1]
want = np.einsum("snhwc,sco->snhwo", x, kernel[:, 0, 0])
np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
# Then the sweep's training: both seeds vmapped, split over the devices, against each seed alone.
config = ablation.load_ablation_module().variant_config("baseline", "cpu", json.loads(sys.argv[1]))
together, records = multiseed.train_seeds(config, [0, 1], vmap_seeds=True)
alone, records_alone = multiseed.train_seeds(config, [0, 1], vmap_seeds=False)
assert records[0].trained_with == "vmap x2", records[0]
for seed in (0, 1):
    np.testing.assert_allclose(records[seed].losses, records_alone[seed].losses, rtol=1e-5)
    chex.assert_trees_all_close(together[seed], alone[seed], rtol=1e-4, atol=1e-5)
print("OK", [r.losses for r in records])
"""


def test_seeds_split_over_two_devices_train_what_each_seed_trains_alone():
    """jit partitioned vmap(step) wrongly over 2 CPU devices (a grouped 1x1 conv returned other
    seeds' features); the seed axis now goes through shard_map (multiseed.seeds_per_device)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    overrides = json.dumps({**TINY, "train.max_steps": STEPS})
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICE_CHECK, overrides], env=env, text=True,
                          capture_output=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_cli_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--sweep", "--variants", "--seeds", "--workdir", "--steps", "--vmap-seeds"):
        assert flag in out


def test_variant_configs_change_only_their_keys():
    abl = ablation.load_ablation_module()
    base = abl.variant_config("baseline", "cpu")
    minus = abl.get_config("minus")
    assert base.model.multires and not minus.model.multires
    assert minus.model.width == base.model.width
    glas_minus = abl.get_config("minus,base=glas")
    assert glas_minus.data.source == "glas" and glas_minus.model.dtype == "bfloat16"
    assert abl.is_eval_only("tta") and abl.is_eval_only("pp_min500") and not abl.is_eval_only("minus")
    assert abl.is_eval_only("pp_split") and not abl.is_eval_only("no_dropout")
    with pytest.raises(KeyError, match="model.widht"):
        abl.variant_config("baseline", "cpu", {"model.widht": 0.5})
    base = str(ablation.DEFAULT_VARIANTS_FILE.parent / "default.py")
    assert ablation.config_overrides(["--config.model.width=1/64", "--config.train.aux_loss=false"],
                                     base) == {"model.width": 1 / 64, "train.aux_loss": False}


def test_an_ablation_seed_is_evaluated_with_mode_evaluate(sweep, tmp_path):
    """One weight format: a trained seed's folder is a --checkpoint like any workdir."""
    from conftest import run_main

    workdir, rows = sweep
    overrides = [f"--config.{k}={v}" for k, v in {**TINY, "train.max_steps": STEPS}.items()]
    run_main("--config", "configs/ablations.py:baseline", *overrides, "--mode=evaluate",
             f"--checkpoint={ablation.run_dir(workdir, 'baseline', 0)}", f"--output={tmp_path}")
    report = json.loads((tmp_path / "report.json").read_text())
    row0 = next(r for r in rows if r["variant"] == "baseline" and r["seed"] == 0)
    for key in ("f1", "pixel_dice"):
        assert float(report["metrics"][key]) == pytest.approx(float(row0[key]), rel=1e-6), key


def test_cli_unknown_config_key_is_the_message_of_main(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--workdir", "unused", "--config.model.widht=0.5"])
    assert exit_info.value.code == 2
    assert "unknown config key 'model.widht'" in capsys.readouterr().err


def test_every_variant_is_a_valid_config():
    """Each variant's delta gives a config the trainer accepts (classes match the target, and so on)."""
    from micronet_jax import core

    abl = ablation.load_ablation_module()
    for sweep in abl.SWEEPS:
        for name in abl.VARIANTS:
            config = abl.variant_config(name, sweep)
            core.check_config(config, num_devices=1)
    contour = abl.variant_config("contour", "cpu")
    assert (contour.data.target, contour.model.num_classes) == ("contour", 3)
