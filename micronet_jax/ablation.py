"""Ablation sweeps: every variant of ``configs/ablations.py`` over several seeds, seeds vmapped together.

Usage::

    python -m micronet_jax.ablation --sweep cpu --variants baseline,minus --seeds 0,1 \\
        --workdir runs/ablation [--steps N] [--config FILE[:ARG]] [--config.model.width=1/64 ...]

The step of :func:`micronet_jax.core.make_setup` is pure, so ``jit(vmap(step))`` over a leading
``seed`` axis of state and batch (split over a ``seed`` mesh of the local devices when the seeds
divide evenly over them) trains S independent models in one program: each seed keeps its own
initialisation and its own data stream; only the compiled code is shared. ``tests/test_ablation.py``
checks that this equals training each seed alone. Layout of ``--workdir``::

    runs/<variant>/seed_<s>/train.json     training record (trained variants only)
    runs/<variant>/seed_<s>/checkpoints/   the trained weights as an Orbax checkpoint (params +
                                           config) that --mode=evaluate|tune|predict --checkpoint reads
    runs/<variant>/seed_<s>/result.json    finished run: training record + validation metrics
    results.csv / results.md / results.png summary over the requested variants and seeds

A rerun skips every (variant, seed) whose ``result.json`` exists (with the same config). Variants that
change only ``eval.*`` keys (``tta``, ``pp_*``) are not trained: they are evaluated with the
baseline's weights of the same seed, so their row isolates the evaluation change. One process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from micronet_jax import checkpointing, cli, core, reporting
from micronet_jax.config import load_module
from micronet_jax.evaluate import json_scalar
from micronet_jax.models.summary import abstract_variables

# Named explicitly: under `python -m` __name__ is "__main__", outside the package logger tree.
logger = logging.getLogger("micronet_jax.ablation")

DEFAULT_VARIANTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "ablations.py"


# ------------------------------------------------------------------------------ config handling


def load_ablation_module(path: str | os.PathLike = DEFAULT_VARIANTS_FILE) -> Any:
    """Imports ``configs/ablations.py`` (VARIANTS, SWEEPS, variant_config) and returns the module."""
    return load_module(path)


def fingerprint(config: ml_collections.ConfigDict, drop: Sequence[str] = ()) -> str:
    """A short hash of the config (minus the ``drop`` sections), to refuse mixing results of
    different settings in one workdir."""
    d = config.to_dict()
    for k in drop:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ pure pieces


def unstack_tree(tree: Any, index: int) -> Any:
    """The ``index``-th slice of a stacked pytree (one seed's state)."""
    return jax.tree.map(lambda x: x[index], tree)


@jax.jit
def _stack(states: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def init_seed_states(init_fn: Any, seeds: Sequence[int], stack: bool = True) -> Any:
    """Initial TrainStates for ``seeds`` from a jitted ``setup.init_fn``: stacked or a list.

    Each seed is initialised alone and the states are stacked afterwards: a vmapped ``model.init``
    compiled ~2x slower on CPU, while one jitted init with a traced seed serves every seed.
    """
    states = [init_fn(jnp.asarray(s, jnp.int32)) for s in seeds]
    return _stack(states) if stack else states


def seed_mesh(num_seeds: int) -> jax.sharding.Mesh:
    """A ``seed`` mesh over the local devices when the seeds divide evenly over them, else over one."""
    devices = jax.local_devices()
    return core.make_mesh("seed", devices if num_seeds % len(devices) == 0 else devices[:1])


# ------------------------------------------------------------------------------ training


@dataclasses.dataclass
class TrainRecord:
    """What one seed's training produced (written as train.json beside the checkpoint)."""

    variant: str
    seed: int
    steps: int
    train_seconds: float
    compile_seconds: float
    final_train_loss: float
    finite: bool
    trained_with: str
    train_fingerprint: str
    losses: list[float]


_SOURCE_CACHE: dict[str, Any] = {}


def _train_source(config: ml_collections.ConfigDict) -> Any:
    """The training images with weight maps, shared by every variant with the same data settings.

    Weight maps cost ~2 s on GlaS; variants differing only in model/optimizer need not redo them.
    """
    from micronet_jax.data.pipeline import TrainSource

    d = config.data.to_dict()
    for k in ("augment", "num_workers", "crop_size"):
        d.pop(k, None)
    key = json.dumps(d, sort_keys=True, default=str)
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()  # Keep at most one source alive (GlaS: hundreds of MB).
        _SOURCE_CACHE[key] = TrainSource.for_training(config.data)
    return _SOURCE_CACHE[key]


class _Programs:
    """The setup, its jitted init and the compiled steps for one (model, optimizer) configuration.

    Variants that differ only in data settings (no_weight_map, no_augment, stain_jitter) train the
    very same program as the baseline; caching it by the config sections the step closes over saves
    one 20-40 s CPU compile (minutes at full width) per such variant.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.setup = core.make_setup(config)
        self.init = jax.jit(self.setup.init_fn)
        self._compiled: dict[tuple, Any] = {}

    def compiled_step(self, state: Any, batch: Any, mesh: jax.sharding.Mesh,
                      vmap_seeds: bool) -> tuple[Any, float]:
        """The step compiled ahead of time for these shapes, and the seconds compiling took (0 if cached).

        Vmapped, state, batch and metrics are split on the ``seed`` axis; alone, everything is
        replicated on a one-device mesh.
        """
        key = (vmap_seeds, str(jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)),
                                            (state, batch))))
        if key in self._compiled:
            return self._compiled[key], 0.0
        where = core.split(mesh) if vmap_seeds else core.replicated(mesh)
        step = core.compile_train_step(
            jax.vmap(self.setup.step_fn) if vmap_seeds else self.setup.step_fn,
            core.state_shardings(state, mesh, where), where, where)
        t0 = time.perf_counter()
        self._compiled[key] = step.lower(state, batch).compile()
        return self._compiled[key], time.perf_counter() - t0


_PROGRAMS: dict[str, _Programs] = {}


def _programs(config: ml_collections.ConfigDict) -> _Programs:
    """Cached :class:`_Programs` keyed by everything the step depends on: model and train sections."""
    key = json.dumps({"model": config.model.to_dict(), "train": config.train.to_dict()},
                     sort_keys=True, default=str)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _Programs(config)
    return _PROGRAMS[key]


def train_seeds(config: ml_collections.ConfigDict, seeds: Sequence[int], *, variant: str = "",
                vmap_seeds: bool = True) -> tuple[list[Any], list[TrainRecord]]:
    """Trains ``config`` once per seed; returns each seed's final ``{"params", "batch_stats"}`` and record.

    With ``vmap_seeds`` the seeds run as one ``jit(vmap(step))`` program; otherwise one after another
    with the plain jitted step (same results, less memory). ``config.seed`` is ignored: each run's seed
    fixes both its initialisation and its data stream.
    """
    core.check_config(config, num_devices=1)  # The batch is not split: devices take seeds.
    programs = _programs(config)
    groups = [list(seeds)] if vmap_seeds else [[s] for s in seeds]
    variables_out: list[Any] = []
    records: list[TrainRecord] = []
    fp = fingerprint(config, drop=("eval", "seed"))
    for group in groups:
        state, history, seconds = _train_group(config, programs, group, variant, vmap_seeds)
        label = f"vmap x{len(group)}" if vmap_seeds else "sequential"
        for j, seed in enumerate(group):
            pick = (lambda x, j=j: x[j]) if vmap_seeds else (lambda x: x)
            losses = [float(pick(h["loss"])) for h in history]
            one = unstack_tree(state, j) if vmap_seeds else state
            variables_out.append(jax.device_get({"params": one.params, "batch_stats": one.batch_stats}))
            tail = losses[-reporting.FINAL_LOSS_WINDOW:]
            records.append(TrainRecord(
                variant=variant, seed=int(seed), steps=programs.setup.total_steps,
                train_seconds=seconds[0], compile_seconds=seconds[1],
                final_train_loss=float(np.mean(tail)) if tail else math.nan,
                finite=all(bool(pick(h["finite"])) for h in history), trained_with=label,
                train_fingerprint=fp, losses=losses,
            ))
        logger.info("%s: trained seeds %s (%s), %d steps in %.1f s (+%.1f s compile)", variant or "run",
                    group, label, programs.setup.total_steps, seconds[0], seconds[1])
    return variables_out, records


def _train_group(config: ml_collections.ConfigDict, programs: _Programs, group: list[int],
                 variant: str, vmap_seeds: bool) -> tuple[Any, list[dict[str, Any]], tuple[float, float]]:
    """Trains one group of seeds; the final (stacked) state, the per-step loss history (host) and
    (train seconds, compile seconds)."""
    from micronet_jax.data.pipeline import make_train_dataset

    source = _train_source(config)
    iters = [iter(make_train_dataset(source, config.data, global_batch_size=int(config.train.batch_size),
                                     seed=int(s), crop_size=int(config.data.crop_size))) for s in group]
    mesh = seed_mesh(len(group)) if vmap_seeds else core.make_mesh("seed", jax.local_devices()[:1])

    def next_batch() -> dict[str, Any]:
        parts = [next(it) for it in iters]
        if not vmap_seeds:
            return parts[0]
        return jax.device_put({k: np.stack([p[k] for p in parts]) for k in parts[0]}, core.split(mesh))

    states = init_seed_states(programs.init, group, stack=vmap_seeds)
    where = core.split(mesh) if vmap_seeds else core.replicated(mesh)
    state = jax.device_put(states if vmap_seeds else states[0], where)
    batch = next_batch()
    compiled, compile_seconds = programs.compiled_step(state, batch, mesh, vmap_seeds)
    n_steps, history = programs.setup.total_steps, []
    t0 = time.perf_counter()
    for i in range(n_steps):
        if i:
            batch = next_batch()
        state, metrics = compiled(state, batch)
        history.append({"loss": metrics["loss"], "finite": metrics["finite"]})
        if (i + 1) % max(1, n_steps // 5) == 0 and i + 1 < n_steps:
            logger.info("%s: step %d/%d (%.1f s)", variant or "run", i + 1, n_steps, time.perf_counter() - t0)
    jax.block_until_ready(state)
    train_seconds = time.perf_counter() - t0
    return state, jax.device_get(history), (train_seconds, compile_seconds)


# ------------------------------------------------------------------------------ evaluation

_FORWARDS: dict[str, Any] = {}


def _model(config: ml_collections.ConfigDict) -> Any:
    """The model of ``config`` from the (cached) setup the training of that config uses."""
    return _programs(config).setup.model


def evaluate_variables(config: ml_collections.ConfigDict, variables: Any,
                       examples: Sequence[Any]) -> dict[str, Any]:
    """Validation metrics of one run through ``evaluate.evaluate_examples`` (the trainer's path)."""
    from micronet_jax import evaluate

    model, key = _model(config), config.model.to_json(sort_keys=True)
    # One compiled tile forward per architecture (seeds, eval-only variants): weights are an argument.
    if key not in _FORWARDS:
        _FORWARDS[key] = core.jit_tile_forward(model)
    compiled = _FORWARDS[key]
    variables = jax.device_put({k: v for k, v in variables.items() if k == "params" or v})
    forward = core.make_forward_fn(model, variables, compiled)
    return evaluate.evaluate_examples(forward, examples, config.eval, model.variant, progress=False,
                                      scale=float(config.data.scale))


# ------------------------------------------------------------------------------ weights on disk


def run_dir(workdir: str | os.PathLike, variant: str, seed: int) -> Path:
    return Path(workdir) / "runs" / variant / f"seed_{seed}"


def save_variables(directory: str | os.PathLike, variables: dict[str, Any], step: int,
                   config: ml_collections.ConfigDict) -> None:
    """A trained seed's weights as an Orbax checkpoint in ``directory/checkpoints/<step>``."""
    variables = {k: v for k, v in variables.items() if k == "params" or v}
    manager = checkpointing.make_manager(os.path.join(directory, "checkpoints"), keep=1)
    try:
        checkpointing.save_weights(manager, step, variables, config=config)
        manager.wait_until_finished()
    finally:
        manager.close()


def restore_variables(directory: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A finished run's trained ``{"params"[, "batch_stats"]}``, read as ``--mode=evaluate`` reads it."""
    variables, _ = checkpointing.restore_variables(
        str(directory), config.model, abstract_variables(_model(config)))
    return jax.device_get(variables)


# ------------------------------------------------------------------------------ the sweep


def run_sweep(
    workdir: str | os.PathLike,
    *,
    sweep: str = "cpu",
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    overrides: dict[str, Any] | None = None,
    steps: int | None = None,
    vmap_seeds: bool = True,
    variants_file: str | os.PathLike = DEFAULT_VARIANTS_FILE,
    base: str | None = None,
    write_outputs: bool = True,
) -> list[dict[str, Any]]:
    """Trains and evaluates every (variant, seed) not finished yet; writes results.{csv,md,png}.

    ``base`` (``FILE[:ARG]``) replaces the sweep's base config file; ``overrides`` apply to every
    variant. Returns one row per requested (variant, seed) with ``status`` "ran" or "skipped".
    """
    sw = _Sweep(Path(workdir), load_ablation_module(variants_file), sweep, base, overrides, steps)
    variants = list(variants) if variants else list(sw.abl.SWEEPS[sweep]["default_variants"])
    unknown = [v for v in variants if v not in sw.abl.VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of {', '.join(sw.abl.VARIANTS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    from micronet_jax import train

    val_examples = train.validation_examples(sw.config_for(sw.abl.BASELINE, seeds[0]))
    if not val_examples:
        raise ValueError("the ablation sweep needs validation images: set data.val_fraction > 0")
    status = {(v, s): "skipped" if sw.finished(v, s) else "pending" for v in variants for s in seeds}
    # Which trained variant each requested variant evaluates (eval-only ones use the baseline).
    weights_of = {v: sw.abl.BASELINE if sw.abl.is_eval_only(v) else v for v in variants}
    for tv in dict.fromkeys(weights_of.values()):
        need = [s for s in seeds
                if any(status[(v, s)] == "pending" for v in variants if weights_of[v] == tv)
                and sw.trained(tv, s) is None]
        if need:
            variables, records = train_seeds(sw.config_for(tv, need[0]), need, variant=tv,
                                             vmap_seeds=vmap_seeds)
            for seed, var, rec in zip(need, variables, records):
                d = run_dir(workdir, tv, seed)
                save_variables(d, var, rec.steps, sw.config_for(tv, seed))
                reporting.write_json(d / "train.json", dataclasses.asdict(rec))
        for v, s in [(v, s) for v in variants if weights_of[v] == tv for s in seeds]:
            if status[(v, s)] == "pending":
                sw.evaluate(v, s, tv, val_examples)
                status[(v, s)] = "ran"
    rows = [dict(sw.finished(v, s), status=status[(v, s)]) for v in variants for s in seeds]
    if write_outputs:
        info = {"sweep": sweep, "seeds": list(seeds), "overrides": sw.overrides,
                "machine": reporting.machine_description(), "baseline": sw.abl.BASELINE}
        reporting.write_results(workdir, rows, info)
    return rows


class _Sweep:
    """One sweep's configs and run folders: what is finished, what is trained, and one evaluation."""

    def __init__(self, workdir: Path, abl: Any, sweep: str, base: str | None,
                 overrides: dict[str, Any] | None, steps: int | None):
        self.workdir, self.abl, self.sweep, self.base = workdir, abl, sweep, base
        self.overrides = dict(overrides or {})
        if steps is not None:
            self.overrides["train.max_steps"] = int(steps)

    def config_for(self, variant: str, seed: int) -> ml_collections.ConfigDict:
        c = self.abl.variant_config(variant, self.sweep, self.overrides, base=self.base)
        c.seed = int(seed)
        return c

    def finished(self, variant: str, seed: int) -> dict[str, Any] | None:
        path = run_dir(self.workdir, variant, seed) / "result.json"
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        if result.get("config_fingerprint") != fingerprint(self.config_for(variant, seed)):
            raise ValueError(
                f"{path} was produced with a different config than this sweep asks for (variant "
                f"{variant}, seed {seed}); use a fresh --workdir or delete that run folder"
            )
        return result

    def trained(self, variant: str, seed: int) -> dict[str, Any] | None:
        d = run_dir(self.workdir, variant, seed)
        if not ((d / "train.json").exists() and checkpointing.step_folders(str(d / "checkpoints"))):
            return None
        record = json.loads((d / "train.json").read_text())
        if record.get("train_fingerprint") != fingerprint(self.config_for(variant, seed),
                                                          drop=("eval", "seed")):
            raise ValueError(f"{d} holds weights trained with a different config; use a fresh --workdir")
        return record

    def evaluate(self, variant: str, seed: int, weights_from: str, val_examples: Sequence[Any]) -> None:
        """Evaluates ``variant`` with the saved weights of ``weights_from``; writes result.json."""
        cfg = self.config_for(variant, seed)
        record = self.trained(weights_from, seed)
        variables = restore_variables(run_dir(self.workdir, weights_from, seed), cfg)
        out = evaluate_variables(cfg, variables, val_examples)
        summary = out["summary"]
        result = {
            "variant": variant, "seed": seed, "sweep": self.sweep, "eval_only": variant != weights_from,
            "weights_from": weights_from,
            **{k: record[k] for k in ("steps", "train_seconds", "compile_seconds",
                                      "final_train_loss", "finite", "trained_with")},
            **{k: json_scalar(float(summary[k])) for k in (*reporting.VAL_METRICS, "precision", "recall")},
            "val_images": len(val_examples),
            "eval_seconds": out["seconds"],
            "overrides": {**self.overrides, **self.abl.VARIANTS[variant]},
            "config_fingerprint": fingerprint(cfg),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        reporting.write_json(run_dir(self.workdir, variant, seed) / "result.json", result)
        logger.info("%s seed %d: F1 %.4f, object Dice %.4f, object Hausdorff %s, pixel Dice %.4f",
                    variant, seed, summary["f1"], summary["object_dice"], summary["object_hausdorff"],
                    summary["pixel_dice"])


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m micronet_jax.ablation",
        description="Train and evaluate Micro-Net ablation variants over several seeds (seeds of a "
                    "variant vmapped into one jitted step), resumably; writes results.csv, "
                    "results.md and results.png in --workdir. --config.section.key=value overrides "
                    "the sweep's base config for every variant (unknown keys are an error, as for "
                    "micronet_jax.main).",
        epilog="Example: python -m micronet_jax.ablation --sweep cpu --variants baseline,minus "
               "--seeds 0,1 --workdir runs/ablation --steps 40 --config.model.width=1/64",
    )
    p.add_argument("--sweep", default="cpu", help="cpu (configs/default.py base) or glas "
                   "(configs/glas_508.py base; needs --config.data.root)")
    p.add_argument("--config", default=None, metavar="FILE[:ARG]",
                   help="base config of every variant (default: the sweep's base file)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names, or 'all' (default: the sweep's default list)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--workdir", help="sweep folder (required unless --list); rerunning resumes it")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (train.max_steps)")
    p.add_argument("--vmap-seeds", action=argparse.BooleanOptionalAction, default=True,
                   help="train the seeds of a variant together in one vmapped step (default on); "
                        "--no-vmap-seeds trains them one after another (less memory)")
    p.add_argument("--variants-file", default=str(DEFAULT_VARIANTS_FILE),
                   help="file defining VARIANTS, SWEEPS and variant_config (default configs/ablations.py)")
    p.add_argument("--list", action="store_true", help="print the variants and their overrides, then exit")
    return p


def config_overrides(argv: Sequence[str], base: str) -> dict[str, Any]:
    """``--config.a.b=v`` arguments -> ``{"a.b": value}``, parsed (and checked) against ``base``
    by the same parser as ``micronet_jax.main``: an unknown key exits with one line naming it."""
    return cli.overridden(argv, cli.parse_config(["--config", base, *argv]))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    abl = load_ablation_module(args.variants_file)
    if args.list:
        for name, delta in abl.VARIANTS.items():
            tag = " (eval only: reuses baseline weights)" if abl.is_eval_only(name) else ""
            print(f"{name:14s} {json.dumps(delta)}{tag}")
        return None
    if not args.workdir:
        parser.error("--workdir is required")
    if args.sweep not in abl.SWEEPS:
        parser.error(f"unknown --sweep {args.sweep!r}; expected one of {', '.join(abl.SWEEPS)}")
    variants = (list(abl.VARIANTS) if args.variants == "all"
                else [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        parser.error(str(e))
    # A bad key fails here, before JAX starts; the base config's platform picks the backend.
    base = args.config or str(Path(args.variants_file).parent / abl.SWEEPS[args.sweep]["base"])
    overrides = config_overrides(rest, base)
    cli.use_platform(abl.variant_config(abl.BASELINE, args.sweep, overrides, base=args.config))
    rows = cli.run_guarded(run_sweep, args.workdir, sweep=args.sweep, variants=variants, seeds=seeds,
                           overrides=overrides, steps=args.steps, vmap_seeds=args.vmap_seeds,
                           variants_file=args.variants_file, base=args.config)
    ran = sum(r["status"] == "ran" for r in rows)
    print(f"{ran} run(s) done, {len(rows) - ran} skipped (already finished) -> "
          f"{os.path.join(args.workdir, 'results.md')}")
    print((Path(args.workdir) / "results.md").read_text())
    return rows


def run() -> None:
    """Console entry point: one logging set-up, as ``micronet_jax.main``."""
    cli.setup_logging()
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
