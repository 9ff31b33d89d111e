"""Ablation sweeps: every variant of ``configs/ablations.py`` over several seeds, seeds vmapped together.

Usage::

    python -m micronet_jax.ablation --sweep cpu --variants baseline,minus --seeds 0,1 \\
        --workdir runs/ablation [--steps N] [--config.model.width=1/64 ...]

Why vmap the seeds: the train step from :func:`micronet_jax.train.make_train_step` is a pure function
``(state, batch) -> (state, metrics)``, so ``jax.jit(jax.vmap(step))`` over a leading "seed" axis of
the state *and* of the batch trains S independent models in one program. Each seed keeps its own
initialisation (``init_state`` with that seed) and its own data stream
(``make_train_dataset(..., seed=seed)``); nothing is shared between seeds except the compiled code.
On an accelerator this fills a device that one small-batch run leaves idle and compiles once per
variant instead of once per run. ``tests/test_ablation.py`` checks that the vmapped step gives the
same parameters per seed as training each seed alone.

Layout of ``--workdir``::

    runs/<variant>/seed_<s>/train.json     training record (trained variants only)
    runs/<variant>/seed_<s>/params.msgpack trained {"params", "batch_stats"} (flax.serialization)
    runs/<variant>/seed_<s>/result.json    finished run: training record + validation metrics
    results.csv / results.md / results.png summary over the requested variants and seeds

A rerun skips every (variant, seed) whose ``result.json`` exists (with the same config), so an
interrupted sweep resumes at run granularity. Variants that change only ``eval.*`` keys (``tta``,
``pp_*``) are not trained: they are evaluated with the baseline's weights of the same seed (the
baseline is trained for them if needed), so their row isolates the evaluation change.

Scope: one process. Several local devices are used by sharding the seed axis over them when the
number of seeds divides evenly; otherwise everything runs on the default device.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from micronet_jax.config import parse_value
from micronet_jax.evaluate import json_scalar

# Named explicitly: under `python -m` __name__ is "__main__", outside the package logger tree.
logger = logging.getLogger("micronet_jax.ablation")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG_FILE = REPO_ROOT / "configs" / "ablations.py"
# Validation metrics carried into results.csv, in this order.
VAL_METRICS = ("f1", "object_dice", "object_hausdorff", "pixel_dice")
CSV_COLUMNS = (
    "variant", "seed", "steps", "train_seconds", "final_train_loss", *VAL_METRICS,
    "precision", "recall", "finite", "eval_seconds", "compile_seconds", "trained_with", "weights_from",
)
# Metrics summarised in results.md; lower is better only for Hausdorff and loss.
SUMMARY_METRICS = (*VAL_METRICS, "final_train_loss", "train_seconds")
# Loss reported as "final": mean over this many last steps (one step's loss is a noisy number).
FINAL_LOSS_WINDOW = 10


# ------------------------------------------------------------------------------ config handling


def load_ablation_module(path: str | os.PathLike = DEFAULT_CONFIG_FILE) -> Any:
    """Imports ``configs/ablations.py`` (configs are files, not a package) and returns the module."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ablation config file not found: {path}")
    spec = importlib.util.spec_from_file_location("_micronet_ablations", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``--config.a.b=v`` arguments -> ``{"a.b": value}``; anything else is an error naming it."""
    overrides: dict[str, Any] = {}
    for arg in args:
        if not arg.startswith("--config.") or "=" not in arg:
            raise ValueError(f"unrecognised argument {arg!r} (config overrides look like --config.a.b=value)")
        key, value = arg[len("--config."):].split("=", 1)
        overrides[key] = parse_value(value)
    return overrides


def fingerprint(config: ml_collections.ConfigDict, drop: Sequence[str] = ()) -> str:
    """A short hash of the config (minus the ``drop`` sections), to refuse mixing results of
    different settings in one workdir."""
    d = config.to_dict()
    for k in drop:
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ pure pieces


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structured pytrees along a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any, index: int) -> Any:
    """The ``index``-th slice of a stacked pytree (one seed's state)."""
    return jax.tree.map(lambda x: x[index], tree)


def make_seed_init(model: Any, tx: Any) -> Callable[[jax.Array], Any]:
    """seed (int32 scalar) -> TrainState, reusing :func:`train.init_state` with a *traced* seed.

    Passing the seed as data instead of a Python constant lets one compiled init serve every seed
    (and be vmapped); ``PRNGKey`` of a traced int gives the same key as of the constant.
    """
    from micronet_jax import train

    return lambda seed: train.init_state(model, tx, seed)()


def init_seed_states(
    model: Any, tx: Any, seeds: Sequence[int], stack: bool = True, init_fn: Callable | None = None
) -> Any:
    """Initial TrainStates for ``seeds``, one ``init_state`` per seed: stacked (``stack``) or a list.

    Each seed is initialised alone and the states are stacked afterwards rather than vmapping
    ``model.init``: a vmapped init compiled ~2x slower on CPU (it carries the whole forward pass and
    batched threefry), while one jitted init with a traced seed serves every seed. ``init_fn`` is a
    jitted :func:`make_seed_init` to reuse.
    """
    init_one = init_fn or jax.jit(make_seed_init(model, tx))
    states = [init_one(jnp.asarray(s, jnp.int32)) for s in seeds]
    return _stack_jit(states) if stack else states


@jax.jit
def _stack_jit(states: list[Any]) -> Any:
    return stack_trees(states)


def make_multi_seed_step(step_fn: Callable, donate: bool = True) -> Callable:
    """``jit(vmap(step))``: stacked states and stacked batches (leading seed axis) -> stacked results."""
    return jax.jit(jax.vmap(step_fn), donate_argnums=0 if donate else ())


# ------------------------------------------------------------------------------ training


@dataclasses.dataclass
class TrainRecord:
    """What one seed's training produced (written as train.json beside params.msgpack)."""

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
    from micronet_jax.data import load_split
    from micronet_jax.data.pipeline import TrainSource

    d = config.data.to_dict()
    for k in ("augment", "num_workers", "crop_size"):
        d.pop(k, None)
    key = json.dumps(d, sort_keys=True, default=str)
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE.clear()  # Keep at most one source alive (GlaS: hundreds of MB).
        _SOURCE_CACHE[key] = TrainSource.from_config(load_split(config.data, "train"), config.data)
    return _SOURCE_CACHE[key]


def _check_config(config: ml_collections.ConfigDict) -> None:
    b, k = int(config.train.batch_size), int(config.train.grad_accum_steps)
    if b < 1 or k < 1 or b % k:
        raise ValueError(f"config train.batch_size={b} must be a positive multiple of train.grad_accum_steps={k}")
    if config.data.crop_size != config.model.variant:
        raise ValueError(f"config data.crop_size={config.data.crop_size} must equal model.variant={config.model.variant}")


def _seed_sharding(num_seeds: int) -> jax.sharding.Sharding | None:
    """Shards the seed axis over the local devices when it divides evenly (else: one device)."""
    n = jax.local_device_count()
    if n <= 1 or num_seeds % n:
        return None
    # Auto axes, as in train.make_mesh: Explicit ones break the cross-entropy gradient.
    mesh = jax.make_mesh((n,), ("seed",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.local_devices())
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("seed"))


class _Programs:
    """The jitted init and the compiled steps for one (model, optimizer) configuration.

    Variants that differ only in data settings (no_weight_map, no_augment, stain_jitter) train the
    very same program as the baseline; caching it by the config sections the step closes over saves
    one 20-40 s CPU compile (minutes at full width) per such variant.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        from micronet_jax import train
        from micronet_jax.models import build_model

        self.model = build_model(config.model)
        self.tx, schedule = train.make_optimizer(config)
        self.step_fn = train.make_train_step(
            self.model, self.tx, schedule,
            steps_per_epoch=train.aux_steps_per_epoch(config),
            aux_loss=bool(config.train.aux_loss),
            grad_accum_steps=int(config.train.grad_accum_steps),
        )
        self.init = jax.jit(make_seed_init(self.model, self.tx))
        self._compiled: dict[tuple, Any] = {}

    def compiled_step(self, state: Any, batch: Any, vmap_seeds: bool) -> tuple[Callable, float]:
        """The step compiled ahead of time for these shapes, and the seconds compiling took (0 if cached)."""
        key = (vmap_seeds, str(jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)),
                                            (state, batch))))
        if key in self._compiled:
            return self._compiled[key], 0.0
        step = make_multi_seed_step(self.step_fn) if vmap_seeds else jax.jit(self.step_fn, donate_argnums=0)
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


def train_seeds(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    *,
    variant: str = "",
    vmap_seeds: bool = True,
) -> tuple[list[Any], list[TrainRecord]]:
    """Trains ``config`` once per seed; returns each seed's final ``{"params", "batch_stats"}`` and record.

    With ``vmap_seeds`` the seeds run as one ``jit(vmap(step))`` program; otherwise one after another
    with the plain jitted step (same results, less memory). ``config.seed`` is ignored: each run's seed
    fixes both its initialisation and its data stream.
    """
    from micronet_jax import train
    from micronet_jax.data.pipeline import make_train_dataset

    _check_config(config)
    n_steps = train.total_steps(config)
    programs = _programs(config)
    model = programs.model
    source = _train_source(config)
    batch_size, crop = int(config.train.batch_size), int(config.data.crop_size)

    def data_iter(seed: int):
        return iter(make_train_dataset(source, config.data, global_batch_size=batch_size,
                                       seed=int(seed), crop_size=crop))

    groups = [list(seeds)] if vmap_seeds else [[s] for s in seeds]
    variables_out: list[Any] = []
    records: list[TrainRecord] = []
    fp = fingerprint(config, drop=("eval", "seed"))
    for group in groups:
        iters = [data_iter(s) for s in group]
        sharding = _seed_sharding(len(group)) if vmap_seeds else None

        def next_batch() -> dict[str, Any]:
            parts = [next(it) for it in iters]
            if not vmap_seeds:
                return parts[0]
            stacked = {k: np.stack([p[k] for p in parts]) for k in parts[0]}
            return jax.device_put(stacked, sharding) if sharding is not None else stacked

        states = init_seed_states(model, programs.tx, group, stack=vmap_seeds, init_fn=programs.init)
        state = states if vmap_seeds else states[0]
        if sharding is not None:
            state = jax.device_put(state, sharding)
        batch = next_batch()
        compiled, compile_seconds = programs.compiled_step(state, batch, vmap_seeds)
        history = []
        t0 = time.perf_counter()
        for i in range(n_steps):
            if i:
                batch = next_batch()
            state, metrics = compiled(state, batch)
            history.append({"loss": metrics["loss"], "finite": metrics["finite"]})
            if (i + 1) % max(1, n_steps // 5) == 0 and i + 1 < n_steps:
                logger.info("%s: step %d/%d (%.1f s)", variant or "run", i + 1, n_steps,
                            time.perf_counter() - t0)
        jax.block_until_ready(state)
        train_seconds = time.perf_counter() - t0
        history = jax.device_get(history)
        label = f"vmap x{len(group)}" if vmap_seeds else "sequential"
        for j, seed in enumerate(group):
            pick = (lambda x, j=j: x[j]) if vmap_seeds else (lambda x: x)
            losses = [float(pick(h["loss"])) for h in history]
            finite = all(bool(pick(h["finite"])) for h in history)
            one = unstack_tree(state, j) if vmap_seeds else state
            variables_out.append(jax.device_get({"params": one.params, "batch_stats": one.batch_stats}))
            tail = losses[-FINAL_LOSS_WINDOW:]
            records.append(TrainRecord(
                variant=variant, seed=int(seed), steps=n_steps, train_seconds=train_seconds,
                compile_seconds=compile_seconds,
                final_train_loss=float(np.mean(tail)) if tail else math.nan,
                finite=finite, trained_with=label, train_fingerprint=fp, losses=losses,
            ))
        logger.info("%s: trained seeds %s (%s), %d steps in %.1f s (+%.1f s compile)",
                    variant or "run", group, label, n_steps, train_seconds, compile_seconds)
    return variables_out, records


# ------------------------------------------------------------------------------ evaluation

_FORWARDS: dict[str, tuple[Any, Callable]] = {}


def _forward_fn(config: ml_collections.ConfigDict, variables: Any) -> tuple[Callable, int]:
    """A tile forward for ``variables``; one compiled program serves all runs of one architecture
    (seeds and eval-only variants), since the weights are an argument of the cached jitted apply."""
    from micronet_jax import evaluate
    from micronet_jax.models import build_model

    key = config.model.to_json(sort_keys=True)
    if key not in _FORWARDS:
        model = build_model(config.model)
        _FORWARDS[key] = (model, evaluate.jit_tile_forward(model))
    model, compiled = _FORWARDS[key]
    variables = jax.device_put(variables)
    if not variables.get("batch_stats"):
        variables = {"params": variables["params"]}
    return evaluate.make_forward_fn(model, variables, compiled), model.variant


def evaluate_variables(
    config: ml_collections.ConfigDict, variables: Any, examples: Sequence[Any]
) -> dict[str, Any]:
    """Validation metrics of one run through ``evaluate.evaluate_examples`` (the trainer's path)."""
    from micronet_jax import evaluate

    forward, tile = _forward_fn(config, variables)
    return evaluate.evaluate_examples(
        forward, examples, config.eval, tile, progress=False, scale=float(config.data.scale)
    )


# ------------------------------------------------------------------------------ the sweep


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write: a killed process leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)


def _as_float(v: Any) -> float:
    return math.inf if v == "inf" else (math.nan if v in (None, "") else float(v))


def run_dir(workdir: str | os.PathLike, variant: str, seed: int) -> Path:
    return Path(workdir) / "runs" / variant / f"seed_{seed}"


def restore_variables(directory: str | os.PathLike) -> dict[str, Any]:
    """A finished run's trained ``{"params", "batch_stats"}`` (numpy) from its run folder."""
    return flax.serialization.msgpack_restore((Path(directory) / "params.msgpack").read_bytes())


def run_sweep(
    workdir: str | os.PathLike,
    *,
    sweep: str = "cpu",
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    overrides: dict[str, Any] | None = None,
    steps: int | None = None,
    vmap_seeds: bool = True,
    config_file: str | os.PathLike = DEFAULT_CONFIG_FILE,
    write_outputs: bool = True,
) -> list[dict[str, Any]]:
    """Trains and evaluates every (variant, seed) not finished yet; writes results.{csv,md,png}.

    Returns one row per requested (variant, seed) with ``status`` "ran" or "skipped" (already done).
    """
    workdir = Path(workdir)
    abl = load_ablation_module(config_file)
    variants = list(variants) if variants else list(abl.SWEEPS[sweep]["default_variants"])
    unknown = [v for v in variants if v not in abl.VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; expected some of {', '.join(abl.VARIANTS)}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    overrides = dict(overrides or {})
    if steps is not None:
        overrides["train.max_steps"] = int(steps)

    def config_for(variant: str, seed: int) -> ml_collections.ConfigDict:
        c = abl.variant_config(variant, sweep, overrides)
        c.seed = int(seed)
        return c

    from micronet_jax import train

    base = config_for(abl.BASELINE, seeds[0])
    val_examples = train._validation_examples(base)
    if not val_examples:
        raise ValueError("the ablation sweep needs validation images: set data.val_fraction > 0")

    def finished(variant: str, seed: int) -> dict[str, Any] | None:
        path = run_dir(workdir, variant, seed) / "result.json"
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        if result.get("config_fingerprint") != fingerprint(config_for(variant, seed)):
            raise ValueError(
                f"{path} was produced with a different config than this sweep asks for (variant "
                f"{variant}, seed {seed}); use a fresh --workdir or delete that run folder"
            )
        return result

    def trained(variant: str, seed: int) -> dict[str, Any] | None:
        d = run_dir(workdir, variant, seed)
        if not ((d / "train.json").exists() and (d / "params.msgpack").exists()):
            return None
        record = json.loads((d / "train.json").read_text())
        if record.get("train_fingerprint") != fingerprint(config_for(variant, seed), drop=("eval", "seed")):
            raise ValueError(f"{d} holds weights trained with a different config; use a fresh --workdir")
        return record

    status = {(v, s): "skipped" if finished(v, s) else "pending" for v in variants for s in seeds}
    # Which trained variant each requested variant evaluates (eval-only ones use the baseline).
    weights_of = {v: abl.BASELINE if abl.is_eval_only(v) else v for v in variants}
    for tv in dict.fromkeys(weights_of.values()):
        need = [s for s in seeds
                if any(status[(v, s)] == "pending" for v in variants if weights_of[v] == tv)
                and trained(tv, s) is None]
        if need:
            cfg = config_for(tv, need[0])
            variables, records = train_seeds(cfg, need, variant=tv, vmap_seeds=vmap_seeds)
            for seed, var, rec in zip(need, variables, records):
                d = run_dir(workdir, tv, seed)
                d.mkdir(parents=True, exist_ok=True)
                (d / "params.msgpack").write_bytes(flax.serialization.to_bytes(var))
                _write_json(d / "train.json", dataclasses.asdict(rec))
        for v in (v for v in variants if weights_of[v] == tv):
            for s in seeds:
                if status[(v, s)] != "pending":
                    continue
                cfg = config_for(v, s)
                record = trained(tv, s)
                variables = restore_variables(run_dir(workdir, tv, s))
                out = evaluate_variables(cfg, variables, val_examples)
                summary = out["summary"]
                result = {
                    "variant": v, "seed": s, "sweep": sweep, "eval_only": v != tv,
                    "weights_from": tv,
                    **{k: record[k] for k in ("steps", "train_seconds", "compile_seconds",
                                              "final_train_loss", "finite", "trained_with")},
                    **{k: json_scalar(float(summary[k])) for k in (*VAL_METRICS, "precision", "recall")},
                    "val_images": len(val_examples),
                    "eval_seconds": out["seconds"],
                    "overrides": {**overrides, **abl.VARIANTS[v]},
                    "config_fingerprint": fingerprint(cfg),
                    "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                }
                _write_json(run_dir(workdir, v, s) / "result.json", result)
                status[(v, s)] = "ran"
                logger.info("%s seed %d: F1 %.4f, object Dice %.4f, object Hausdorff %s, pixel Dice %.4f",
                            v, s, summary["f1"], summary["object_dice"], summary["object_hausdorff"],
                            summary["pixel_dice"])
    rows = []
    for v in variants:
        for s in seeds:
            row = finished(v, s)
            row["status"] = status[(v, s)]
            rows.append(row)
    if write_outputs:
        info = {"sweep": sweep, "seeds": list(seeds), "overrides": overrides,
                "machine": machine_description(), "baseline": abl.BASELINE}
        write_results(workdir, rows, info)
    return rows


# ------------------------------------------------------------------------------ reports


def machine_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return (f"{jax.device_count()} x {d.platform} ({kind}), {os.cpu_count()} CPU cores, "
            f"{platform.system()} {platform.machine()}, jax {jax.__version__}")


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1); inf if any value is inf (an empty prediction), nan std for n=1."""
    arr = np.asarray(values, float)
    if arr.size == 0:
        return math.nan, math.nan
    if np.isinf(arr).any():
        return math.inf, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> metric -> (mean, std, n) over seeds."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for v in dict.fromkeys(r["variant"] for r in rows):
        vr = [r for r in rows if r["variant"] == v]
        out[v] = {m: (*_mean_std([_as_float(r[m]) for r in vr]), len(vr)) for m in SUMMARY_METRICS}
    return out


def _fmt(x: float, digits: int = 3) -> str:
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def markdown_summary(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """Mean ± std over seeds per variant, with the difference of means from the baseline."""
    stats = summarize(rows)
    baseline = info.get("baseline", "baseline")
    headers = ["F1", "object Dice", "object Hausdorff", "pixel Dice", "final train loss", "train s"]
    lines = [
        f"# Ablation sweep `{info.get('sweep')}`: mean ± std over seeds {info.get('seeds')}",
        "",
        "Each cell: mean ± sample std over seeds, then (Δ = variant mean − baseline mean). Validation "
        "split, pooled GlaS metrics; higher is better except object Hausdorff and loss.",
        "",
        "| variant | n | " + " | ".join(headers) + " |",
        "|---|---|" + "---|" * len(headers),
    ]
    base = stats.get(baseline)
    for v, metrics in stats.items():
        cells = []
        for m in SUMMARY_METRICS:
            mean, std, n = metrics[m]
            digits = 1 if m in ("train_seconds", "object_hausdorff") else 3
            cell = f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"
            if base is not None and v != baseline and m != "train_seconds":
                delta = mean - base[m][0]
                cell += f" ({'+' if delta >= 0 else ''}{_fmt(delta, digits)})" if math.isfinite(delta) else " (–)"
            cells.append(cell)
        lines.append(f"| {v} | {metrics['f1'][2]} | " + " | ".join(cells) + " |")
    eval_only = sorted({r["variant"] for r in rows if r.get("eval_only")})
    trained_with = sorted({r["trained_with"] for r in rows})
    lines += [
        "",
        f"- Final train loss: mean of the last {FINAL_LOSS_WINDOW} steps' weighted cross-entropy. "
        f"Train seconds: wall time of the training loop (data + steps, compile excluded) of the group "
        f"of seeds trained together ({', '.join(trained_with)}), so seeds of one variant share it.",
    ]
    if eval_only:
        lines.append(f"- Eval-only variants ({', '.join(eval_only)}) were not retrained: they reuse the "
                     f"{baseline} weights of the same seed, so their Δ is the evaluation change alone "
                     "(their loss and train seconds are the baseline's).")
    lines += [
        f"- Overrides on the sweep's base config: `{json.dumps(info.get('overrides', {}))}`.",
        f"- Machine: {info.get('machine', '?')}.",
    ]
    return "\n".join(lines) + "\n"


def plot_results(rows: Sequence[dict[str, Any]], out_path: str | os.PathLike,
                 metrics: Sequence[str] = VAL_METRICS) -> None:
    """One panel per metric: mean per variant with a ±std error bar and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(rows)
    names = list(stats)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for i, v in enumerate(names):
            mean, std, _ = stats[v][m]
            if math.isfinite(mean):
                ax.bar(i, mean, color="C0" if i else "C1", alpha=0.6,
                       yerr=std if math.isfinite(std) else None, capsize=3)
            else:
                ax.text(i, 0, "inf", ha="center", va="bottom", fontsize=7)
            seed_values = [_as_float(r[m]) for r in rows if r["variant"] == v]
            finite = [x for x in seed_values if math.isfinite(x)]
            ax.plot([i] * len(finite), finite, "k.", markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(m.replace("_", " ") + (" (lower better)" if m == "object_hausdorff" else ""),
                     fontsize=9)
        if m != "object_hausdorff":
            ax.set_ylim(0, 1)
    fig.suptitle("ablations: mean ± std over seeds (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def write_results(workdir: str | os.PathLike, rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> None:
    """results.csv (one row per variant and seed), results.md (summary) and results.png."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (workdir / "results.md").write_text(markdown_summary(rows, info))
    plot_results(rows, workdir / "results.png")


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m micronet_jax.ablation",
        description="Train and evaluate Micro-Net ablation variants over several seeds (seeds of a "
                    "variant vmapped into one jitted step), resumably; writes results.csv, "
                    "results.md and results.png in --workdir. Extra --config.a.b=value arguments "
                    "override the sweep's base config for every variant.",
        epilog="Example: python -m micronet_jax.ablation --sweep cpu --variants baseline,minus "
               "--seeds 0,1 --workdir runs/ablation --steps 40",
    )
    p.add_argument("--sweep", default="cpu", help="cpu (configs/default.py base) or glas "
                   "(configs/glas_508.py base; needs --config.data.root)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names, or 'all' (default: the sweep's default list)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--workdir", help="sweep folder (required unless --list); rerunning resumes it")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (train.max_steps)")
    p.add_argument("--vmap-seeds", action=argparse.BooleanOptionalAction, default=True,
                   help="train the seeds of a variant together in one vmapped step (default on); "
                        "--no-vmap-seeds trains them one after another (less memory)")
    p.add_argument("--config-file", default=str(DEFAULT_CONFIG_FILE),
                   help="file defining VARIANTS, SWEEPS and variant_config (default configs/ablations.py)")
    p.add_argument("--list", action="store_true", help="print the variants and their overrides, then exit")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_config_overrides(rest)
    except ValueError as e:
        parser.error(str(e))
    abl = load_ablation_module(args.config_file)
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
        # Fail on a bad key before JAX starts, and pick the platform the base config asks for.
        probe = abl.variant_config(abl.BASELINE, args.sweep, overrides)
    except (ValueError, KeyError, TypeError) as e:
        parser.error(str(e))
    if probe.get("platform"):
        os.environ.setdefault("JAX_PLATFORMS", probe.platform)
    try:
        rows = run_sweep(args.workdir, sweep=args.sweep, variants=variants, seeds=seeds,
                         overrides=overrides, steps=args.steps, vmap_seeds=args.vmap_seeds,
                         config_file=args.config_file)
    except (ValueError, FileNotFoundError) as e:  # Bad input (incl. DataError): one line, no traceback.
        if os.environ.get("MICRONET_DEBUG"):
            raise
        parser.exit(2, f"error: {e}\n(set MICRONET_DEBUG=1 to see the traceback)\n")
    ran = sum(r["status"] == "ran" for r in rows)
    print(f"{ran} run(s) done, {len(rows) - ran} skipped (already finished) -> "
          f"{os.path.join(args.workdir, 'results.md')}")
    print((Path(args.workdir) / "results.md").read_text())
    return rows


def run() -> None:
    """Console entry point: package logs at INFO, libraries' at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("micronet_jax").setLevel(logging.INFO)
    main(sys.argv[1:])


if __name__ == "__main__":
    run()
