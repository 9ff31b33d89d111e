"""Throughput of the real training step and of tiled inference, for GPU sizing and MFU.

Training: for each batch size x compute dtype x remat setting, builds the :class:`~micronet_jax.core.Trainer`
the training loop uses, compiles its jitted ``train_step`` ahead of time (timed on its own), puts one
synthetic batch on the device once, and times the step itself (warm-up excluded, each step finished
with ``block_until_ready``, median over ``--steps``). The input pipeline is excluded on purpose: it is
measured by ``python -m micronet_jax.data.benchmark`` (docs/pipeline_timing.md), and a step that is
slower than the pipeline is the number that sizes a GPU run.

FLOPs are the analytic count of :func:`micronet_jax.models.summary.forward_flops` (1.337 TFLOP per
508 patch at full width), times 3 for a training step (forward + backward ~ 2x forward); XLA's own
``cost_analysis`` undercounts cuDNN convs on GPU (jax_notes.md). MFU is that rate over
``--peak-tflops`` (800 by default: the issue's figure for an H100's dense bf16 peak; remat's
recomputation is deliberately not counted, as is usual for MFU).

Inference: tiles/s of the jitted tile forward (:func:`micronet_jax.core.make_forward_fn`, host
tiles in and host logits out, exactly as tiled inference calls it) at ``eval.tile_batch``, and whole
GlaS-sized synthetic images (775x522) per second through
:func:`~micronet_jax.evaluate.predict_probabilities` + :func:`~micronet_jax.evaluate.to_instances`,
optionally with 8-way TTA.

Examples::

    python -m micronet_jax.benchmark --config configs/synthetic_508.py --batch 8,16 \\
        --dtype bfloat16,float32 --remat false,true --steps 20 --peak-tflops 800 --json bench.json
    python -m micronet_jax.benchmark --config configs/default.py --steps 3 --batch 2   # CPU check

Parameters and optimizer state are random arrays of the right shapes, not ``model.init``: the values
do not change the speed, and it saves one compile of the initialiser per configuration (~25 s on the
CPU). Peak memory comes from ``device.memory_stats()`` (GPU/TPU); that counter is a process-wide
high-water mark, so a configuration that did not raise it is shown as an upper bound (``<=``); run
one configuration per process for exact figures. Where the device has no memory counters (CPU), XLA's
``memory_analysis()`` of the compiled step is shown instead (marked ``xla``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from micronet_jax import cli, core

DEFAULT_PEAK_TFLOPS = 800.0  # H100 dense bf16, as the performance issue states it.
GIB = 2.0**30


# ------------------------------------------------------------------------------------ config


def _csv(kind: Any):
    """An argparse type for comma-separated lists (``8,16``; ``false,true``)."""

    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is bool:
            out = []
            for t in items:
                if t.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise argparse.ArgumentTypeError(f"expected true/false, got {t!r}")
                out.append(t.lower() in ("true", "1", "yes"))
            return out
        return [kind(t) for t in items]

    return parse


# ------------------------------------------------------------------------------- synthetic data


def random_variables(abstract: Any, rng: np.random.Generator) -> Any:
    """Host arrays shaped like ``abstract``: fan-in-scaled normal kernels, unit scales/variances, else 0.

    Scaled kernels keep tanh activations in range, so the timed arithmetic is ordinary (no NaN/inf
    paths); the values themselves do not affect the speed of dense convs.
    """

    def make(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", ""))) if path else ""
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(shape, dtype)
        if name == "kernel" and len(shape) >= 2 and np.issubdtype(dtype, np.floating):
            fan_in = math.prod(shape[:-1])
            return (rng.standard_normal(shape, np.float32) / math.sqrt(fan_in)).astype(dtype)
        return np.zeros(shape, dtype)

    return jax.tree_util.tree_map_with_path(make, abstract)


def synthetic_state(trainer: Any, seed: int = 0) -> Any:
    """A :class:`~micronet_jax.core.TrainState` with random weights and fresh Adam moments, born sharded.

    Built on the host from ``trainer.abstract_state`` and put with ``trainer.state_sharding``, so no
    initialiser is compiled (one compile fewer per configuration).
    """
    rng = np.random.default_rng(seed)
    abstract = trainer.abstract_state
    zeros = lambda s: np.zeros(s.shape, s.dtype)  # noqa: E731
    host = abstract.replace(
        step=zeros(abstract.step),
        params=random_variables(abstract.params, rng),
        batch_stats=random_variables(abstract.batch_stats, rng),
        opt_state=jax.tree.map(zeros, abstract.opt_state),  # Adam's initial state is all zeros.
        rng=zeros(abstract.rng),
    )
    if abstract.ema:  # train.ema_decay: the average starts at the weights, as in initial_state.
        host = host.replace(ema=host.variables())
    return jax.device_put(host, trainer.state_sharding)


def synthetic_batch(trainer: Any, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
    """One global training batch of the pipeline's shapes and dtypes, already sharded on the device."""
    rng = np.random.default_rng(seed + jax.process_index())
    n, v = batch_size // jax.process_count(), trainer.model.variant
    local = {
        "image": rng.standard_normal((n, v, v, 3), np.float32),
        "label": rng.integers(0, 2, (n, v, v), dtype=np.int32),
        "weight": rng.uniform(1.0, 10.0, (n, v, v)).astype(np.float32),
    }
    return core.global_batch(local, trainer.mesh)


# ------------------------------------------------------------------------------------- memory


def _device_peak_bytes() -> int | None:
    """The first local device's allocator high-water mark, or None where there is none (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # Some backends raise instead of returning None.
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def _xla_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries of a compiled program, minus donated (aliased) outputs."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total - getattr(m, "alias_size_in_bytes", 0))


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


# ------------------------------------------------------------------------------------ training


def bench_train(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    dtype: str,
    remat: bool,
    steps: int,
    warmup: int,
    forward_flops: float,
    peak_tflops: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Times ``core.Trainer(config).train_step`` for one configuration; returns one result row."""
    c = copy.deepcopy(config)
    c.train.batch_size = int(batch_size)
    c.model.dtype = dtype
    c.model.remat = bool(remat)
    row: dict[str, Any] = {
        "batch": int(batch_size), "dtype": dtype, "remat": bool(remat),
        "remat_heads": bool(c.model.remat_heads),
        "grad_accum_steps": int(c.train.grad_accum_steps), "steps": steps, "warmup": warmup,
    }
    peak_before = _device_peak_bytes()
    trainer = state = batch = None
    try:
        trainer = core.Trainer(c)
        state = synthetic_state(trainer, seed)
        batch = synthetic_batch(trainer, batch_size, seed)
        t0 = time.perf_counter()
        lowered = trainer.train_step.lower(state, batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        row.update(lower_s=t1 - t0, compile_s=t2 - t1, compile_total_s=t2 - t0,
                   xla_bytes=_xla_bytes(compiled))
        # The jitted step reuses the executable compiled above (same function, shapes, shardings).
        for _ in range(warmup):
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready((state, metrics))
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t)
        row["loss_finite"] = bool(jax.device_get(metrics["finite"]))
    except Exception as e:  # An OOM configuration is a result, not the end of the benchmark.
        if not _is_oom(e):
            raise
        row.update(error="OOM", detail=str(e).splitlines()[0][:300])
        return row
    finally:
        del trainer, state, batch
    med = statistics.median(times)
    patches_s = batch_size / med
    tflops = 3.0 * forward_flops * patches_s / 1e12
    row.update(
        step_s_median=med, step_s_min=min(times), step_s_max=max(times), step_s_all=times,
        patches_per_s=patches_s, tflops=tflops, mfu=tflops / peak_tflops,
    )
    peak_after = _device_peak_bytes()
    if peak_after is not None:
        # A process-wide high-water mark: exact only if this configuration raised it.
        row.update(peak_bytes=peak_after, peak_source="device",
                   peak_is_upper_bound=peak_before is not None and peak_after <= peak_before)
    elif row.get("xla_bytes") is not None:
        row.update(peak_bytes=row["xla_bytes"], peak_source="xla", peak_is_upper_bound=False)
    else:
        row.update(peak_bytes=None, peak_source=None, peak_is_upper_bound=False)
    return row


# ----------------------------------------------------------------------------------- inference


def bench_inference(
    config: ml_collections.ConfigDict,
    *,
    dtype: str,
    steps: int,
    warmup: int,
    images: int,
    tta_modes: Sequence[bool],
    image_hw: tuple[int, int],
    forward_flops: float,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Tiles/s of the tile forward and whole images/s (tiling + post-processing), one row per TTA mode."""
    from micronet_jax import evaluate, infer
    from micronet_jax.data.synthetic import make_synthetic_glands
    from micronet_jax.models.summary import abstract_variables

    c = copy.deepcopy(config)
    c.model.dtype = dtype
    model = core.make_setup(c).model
    variables = jax.device_put(random_variables(abstract_variables(model), np.random.default_rng(seed)))
    forward = core.make_forward_fn(model, variables)
    tile, tile_batch = model.variant, int(c.eval.tile_batch)
    tiles = np.random.default_rng(seed).standard_normal((tile_batch, tile, tile, 3), np.float32)

    t = time.perf_counter()
    forward(tiles)  # Compiles (the first call of a jitted function).
    first_call_s = time.perf_counter() - t
    for _ in range(max(0, warmup - 1)):
        forward(tiles)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        forward(tiles)  # Returns a host array, so it has finished.
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    tiles_s = tile_batch / med

    examples = make_synthetic_glands(images, image_hw[0], image_hw[1], seed=seed)
    rows = []
    for tta in tta_modes:
        c.eval.tta = bool(tta)
        per_image, post = [], []
        for ex in examples:
            t = time.perf_counter()
            prob = evaluate.predict_probabilities(forward, ex.image, c.eval, tile, float(c.data.scale),
                                                     str(c.data.normalize))
            t_mid = time.perf_counter()
            evaluate.to_instances(prob, c.eval)
            t_end = time.perf_counter()
            per_image.append(t_end - t)
            post.append(t_end - t_mid)
        padded = [n + 2 * int(c.eval.margin) for n in image_hw]
        n_tiles = math.prod(len(infer.tile_positions(max(p, tile), tile, int(c.eval.margin)))
                            for p in padded) * (8 if tta else 1)
        rows.append({
            "dtype": dtype, "tile_batch": tile_batch, "tta": bool(tta), "steps": steps,
            "forward_first_call_s": first_call_s, "forward_s_median": med, "tiles_per_s": tiles_s,
            "forward_tflops": forward_flops * tiles_s / 1e12,
            "images": len(examples), "image_hw": list(image_hw), "tiles_per_image": n_tiles,
            "images_per_s": len(per_image) / sum(per_image),
            "image_s_median": statistics.median(per_image),
            "postprocess_s_median": statistics.median(post),
        })
    return rows


# ------------------------------------------------------------------------------------- report


def _fmt_bytes(row: dict[str, Any]) -> str:
    if row.get("peak_bytes") is None:
        return "n/a"
    text = f"{row['peak_bytes'] / GIB:.2f}"
    if row.get("peak_is_upper_bound"):
        text = "<=" + text
    return text + (" (xla)" if row.get("peak_source") == "xla" else "")


def format_train_table(rows: Sequence[dict[str, Any]], peak_tflops: float) -> str:
    """A Markdown table of the training rows (paste-able into docs/benchmarks.md)."""
    head = ("| batch | dtype | remat | step ms (median) | patches/s | TFLOP/s | "
            f"MFU (of {peak_tflops:g}) | peak mem GiB | compile s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        remat = str(r["remat"]).lower() + ("" if r.get("remat_heads", True) else " (heads stored)")
        lead = f"| {r['batch']} | {r['dtype']} | {remat} |"
        if "error" in r:
            lines.append(f"{lead} {r['error']} | - | - | - | - | {r.get('compile_total_s', float('nan')):.1f} |")
            continue
        lines.append(
            f"{lead} {1e3 * r['step_s_median']:.1f} | {r['patches_per_s']:.3g} | {r['tflops']:.3g} | "
            f"{100 * r['mfu']:.3g}% | {_fmt_bytes(r)} | {r['compile_total_s']:.1f} |"
        )
    return "\n".join(lines)


def format_inference_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of the inference rows."""
    lines = [
        "| dtype | tile batch | TTA | tiles/s | forward TFLOP/s | tiles/image | images/s | "
        "s/image (median) | post-process s/image | first call (compile) s |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['tile_batch']} | {'8-way' if r['tta'] else 'off'} | "
            f"{r['tiles_per_s']:.3g} | {r['forward_tflops']:.3g} | {r['tiles_per_image']} | "
            f"{r['images_per_s']:.3g} | {r['image_s_median']:.2f} | {r['postprocess_s_median']:.3f} | "
            f"{r['forward_first_call_s']:.1f} |"
        )
    return "\n".join(lines)


def _meta(args: argparse.Namespace, config: ml_collections.ConfigDict, forward_flops: float) -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": list(args.argv),
        "config": args.config,
        "overrides": list(args.overrides),
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "variant": int(config.model.variant),
        "width": float(config.model.width),
        "forward_tflop_per_patch": forward_flops / 1e12,
        "train_tflop_per_patch": 3 * forward_flops / 1e12,
        "peak_tflops": args.peak_tflops,
        "compilation_cache_dir": getattr(jax.config, "jax_compilation_cache_dir", None)
        or os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        "malloc_hugepages": cli.malloc_hugepages(),  # config.cpu_hugepages's restart, or the user's.
    }


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m micronet_jax.benchmark",
        description=(
            "Times the real jitted train step (patches/s, TFLOP/s, MFU, peak memory, compile time) "
            "for each batch x dtype x remat, and tiled inference (tiles/s, whole 775x522 images/s "
            "with post-processing). Lists are comma-separated; omitted lists take the config's value."
        ),
        epilog=(
            "examples:\n"
            "  python -m micronet_jax.benchmark --config configs/synthetic_508.py --batch 8,16 \\\n"
            "      --dtype bfloat16,float32 --remat false,true --steps 20 --json bench.json\n"
            "  python -m micronet_jax.benchmark --config configs/default.py --config.model.width=1/64 --steps 3\n"
            "Peak memory: device allocator high-water mark where available ('<=' = this configuration "
            "did not raise\nthe process-wide mark), else XLA's memory analysis of the step ('xla')."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="config file, optionally with ':ARG' (e.g. configs/synthetic_508.py); "
                        "--config.section.key=value overrides any field, as for micronet_jax.main")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="deprecated spelling of --config.KEY=VALUE (still accepted)")
    p.add_argument("--batch", type=_csv(int), default=None,
                   help="global batch sizes (default: train.batch_size)")
    p.add_argument("--dtype", type=_csv(str), default=None,
                   help="compute dtypes, float32 and/or bfloat16 (default: model.dtype)")
    p.add_argument("--remat", type=_csv(bool), default=None,
                   help="block rematerialisation settings, e.g. false,true (default: model.remat); "
                        "the output heads are recomputed either way unless "
                        "--config.model.remat_heads=false")
    p.add_argument("--steps", type=int, default=20,
                   help="timed steps per configuration, median reported; also the timed tile forwards "
                        "(default: 20)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps after compiling, for first-execution costs (default: 1)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help="device peak for MFU in TFLOP/s (default: 800, an H100's dense bf16 peak as "
                        "the performance issue states it)")
    p.add_argument("--tile-batch", type=int, default=None,
                   help="tiles per forward call for inference (default: eval.tile_batch)")
    p.add_argument("--images", type=int, default=2,
                   help="synthetic whole images timed through tiling + post-processing (default: 2)")
    p.add_argument("--image-size", default="522x775", metavar="HxW",
                   help="synthetic image size (default: 522x775, GlaS)")
    p.add_argument("--tta", action="store_true",
                   help="also time whole images with 8-way flip/rot90 test-time augmentation")
    p.add_argument("--skip-train", action="store_true", help="time inference only")
    p.add_argument("--skip-inference", action="store_true", help="time the train step only")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic arrays (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every result as JSON")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """The benchmark's own flags, and the config from ``--config`` and its ``--config.*`` overrides
    (``--set KEY=VALUE`` is the deprecated spelling of ``--config.KEY=VALUE``)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for assignment in args.set:
        if "=" not in assignment:
            parser.error(f"--set expects KEY=VALUE, got {assignment!r}")
        print(f"note: --set {assignment} is deprecated; write --config.{assignment.strip()}", file=sys.stderr)
    args.overrides = [*(f"--config.{a.strip()}" for a in args.set), *rest]
    args.argv = list(argv)
    return args, cli.parse_config(["--config", args.config, *args.overrides])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the tables and returns ``{"meta", "train", "inference"}``."""
    args, config = parse_args(list(sys.argv[1:] if argv is None else argv))
    cli.use_platform(config, restart=argv is None)  # Only as a program: see cli.restart_with_hugepages.
    if args.tile_batch is not None:
        config.eval.tile_batch = args.tile_batch
    if args.steps < 1 or args.warmup < 0 or args.images < 1:
        raise SystemExit("error: need --steps >= 1, --warmup >= 0 and --images >= 1")
    try:
        image_hw = tuple(int(v) for v in args.image_size.lower().split("x"))
        assert len(image_hw) == 2 and min(image_hw) > 0
    except (ValueError, AssertionError):
        raise SystemExit(f"error: --image-size must be HxW, got {args.image_size!r}") from None
    batches = args.batch or [int(config.train.batch_size)]
    dtypes = args.dtype or [str(config.model.dtype)]
    remats = args.remat if args.remat is not None else [bool(config.model.remat)]
    from micronet_jax.models import DTYPES
    from micronet_jax.models.summary import forward_flops as count_forward_flops

    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"error: --dtype {d!r} is not one of {sorted(DTYPES)}")
    flops = count_forward_flops(core.make_setup(config).model)
    meta = _meta(args, config, flops)
    print(f"Micro-Net-{meta['variant']} width={meta['width']:g}: {meta['forward_tflop_per_patch']:.4f} "
          f"TFLOP forward per patch (training step: 3x). Device: {meta['device_count']} x "
          f"{meta['device_kind']} ({meta['platform']}), jax {meta['jax']}"
          + (f", malloc huge pages {'on' if meta['malloc_hugepages'] else 'off'}"
             if meta["platform"] == "cpu" else "") + ".", flush=True)
    if args.steps < 20:
        print(f"note: median of {args.steps} steps (< 20): a quick check, not a benchmark.")
    if meta["compilation_cache_dir"]:
        print(f"note: persistent compilation cache {meta['compilation_cache_dir']} is on; "
              "compile times may be cache hits.")

    train_rows: list[dict[str, Any]] = []
    if not args.skip_train:
        for b in batches:
            for d in dtypes:
                for r in remats:
                    print(f"train step: batch {b}, {d}, remat {str(r).lower()} ...", flush=True)
                    train_rows.append(bench_train(
                        config, batch_size=b, dtype=d, remat=r, steps=args.steps,
                        warmup=args.warmup, forward_flops=flops, peak_tflops=args.peak_tflops,
                        seed=args.seed,
                    ))
    infer_rows: list[dict[str, Any]] = []
    if not args.skip_inference:
        for d in dtypes:
            print(f"inference: {d}, tile batch {config.eval.tile_batch} ...", flush=True)
            infer_rows += bench_inference(
                config, dtype=d, steps=args.steps, warmup=args.warmup, images=args.images,
                tta_modes=[False, True] if args.tta else [False], image_hw=image_hw,
                forward_flops=flops, seed=args.seed,
            )

    if train_rows:
        print("\nTraining step (synthetic batch on device; input pipeline excluded)")
        print(format_train_table(train_rows, args.peak_tflops))
    if infer_rows:
        print(f"\nTiled inference ({image_hw[1]}x{image_hw[0]} synthetic images, margin "
              f"{config.eval.margin}, stitch {config.eval.stitch}, post-processing included)")
        print(format_inference_table(infer_rows))
    result = {"meta": meta, "train": train_rows, "inference": infer_rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return result


def run() -> None:
    """Console entry point: one logging set-up and one-line errors, as ``micronet_jax.main``."""
    cli.setup_logging()
    cli.run_guarded(main)


if __name__ == "__main__":
    run()
