"""Ablation sweeps: every variant of ``configs/ablations.py`` over several seeds, seeds vmapped together.

Usage::

    python -m micronet_jax.ablation --sweep cpu --variants baseline,minus --seeds 0,1 \\
        --workdir runs/ablation [--steps N] [--config FILE[:ARG]] [--config.model.width=1/64 ...]

The seeds of a variant train together as one ``jit(vmap(step))`` program (``micronet_jax.multiseed``):
each keeps its own initialisation and data stream. Layout of ``--workdir``::

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
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections

from micronet_jax import checkpointing, cli, core, reporting
from micronet_jax.config import load_module
from micronet_jax.evaluate import json_scalar
from micronet_jax.models.summary import abstract_variables
from micronet_jax.multiseed import fingerprint, programs_for, train_seeds

# Named explicitly: under `python -m` __name__ is "__main__", outside the package logger tree.
logger = logging.getLogger("micronet_jax.ablation")

DEFAULT_VARIANTS_FILE = Path(__file__).resolve().parents[1] / "configs" / "ablations.py"


# ------------------------------------------------------------------------------ config handling


def load_ablation_module(path: str | os.PathLike = DEFAULT_VARIANTS_FILE) -> Any:
    """Imports ``configs/ablations.py`` (VARIANTS, SWEEPS, variant_config) and returns the module."""
    return load_module(path)


# ------------------------------------------------------------------------------ evaluation

_FORWARDS: dict[str, Any] = {}


def _model(config: ml_collections.ConfigDict) -> Any:
    """The model of ``config`` from the (cached) setup the training of that config uses."""
    return programs_for(config).setup.model


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
                                      scale=float(config.data.scale), normalize=str(config.data.normalize))


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
    cli.use_platform(abl.variant_config(abl.BASELINE, args.sweep, overrides, base=args.config),
                     restart=argv is None)  # Only as a program: see cli.restart_with_hugepages.
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
    main()  # argv None: the command line's own arguments, and this process may restart (cli.py).


if __name__ == "__main__":
    run()
