"""The helpers of ``launch/speedrun.sh``: machine facts, budget fitting, tuned flags, and the summary.

Each is a subcommand, so the shell script never parses a program's printed output:

    python -m micronet_jax.tools.speedrun_summary machine --json OUT/machine.json
    python -m micronet_jax.tools.speedrun_summary budget --config configs/glas_speedrun.py \\
        --seconds 400 [--fit --bench OUT/bench.json] [--config.train.batch_size=16 ...]
    python -m micronet_jax.tools.speedrun_summary tune-flags OUT/tune/best.json
    python -m micronet_jax.tools.speedrun_summary summarize --out OUT --workdir WORKDIR

``summarize`` reads only files the stages wrote (``stages.tsv`` from the script, ``machine.json``,
the benchmark's ``--json``, the PyTorch peer's JSON lines, the workdir's ``config.json``,
``metrics.jsonl`` and ``eval_val/report.json``, the tuner's ``best.json`` and the tuned evaluation's
``report.json``) and writes ``summary.json`` and ``summary.md`` into OUT; whatever a failed or skipped
stage did not write is reported as "not measured", never guessed. Only ``machine`` imports JAX.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import sys
from collections.abc import Sequence
from typing import Any

GIB = 2.0**30
# The paper's GlaS Test A object F1 (micronet_spec.md §6; micronet_jax.evaluate.PAPER_RESULTS) and the
# issue's targets. A validation split of the training images is not Test A: the comparison is the
# issue's acceptance rule, not a claim that the figures measure the same thing.
PAPER_TEST_A_F1 = 0.913
TARGET_RATIO_OVER_PYTORCH = 1.3
TARGET_PEAK_GIB = 20.0
TARGET_MINUTES = 10.0


# ------------------------------------------------------------------------------------- reading


def read_json(path: str) -> Any | None:
    """The parsed file, or None when it does not exist or cannot be parsed (a stage did not finish)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a file of JSON lines; other lines (warnings, progress) are skipped."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
    except OSError:
        pass
    return rows


def read_stages(path: str) -> list[dict[str, Any]]:
    """``stages.tsv``: one line per stage, ``name<TAB>start<TAB>end<TAB>status`` (epoch seconds)."""
    stages = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 4:
                    continue
                name, start, end, status = parts
                try:
                    seconds = float(end) - float(start)
                except ValueError:
                    seconds = None
                stages.append({"name": name, "start": float(start), "seconds": seconds,
                               "status": status})
    except OSError:
        pass
    return stages


def planned_steps(config: dict[str, Any]) -> int:
    """``core.total_steps`` from a saved config.json (the same arithmetic as the trainer)."""
    t = config["train"]
    steps = max(1, int(t["patches_per_epoch"]) // int(t["batch_size"])) * int(t["epochs"])
    if t.get("max_steps") is not None:
        steps = min(steps, int(t["max_steps"]))
    return steps


# -------------------------------------------------------------------------------------- sections


def bench_section(bench: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bare-step row of ``python -m micronet_jax.benchmark --json`` (the first training row)."""
    if not bench or not bench.get("train"):
        return None
    row = bench["train"][0]
    out = {"batch": row.get("batch"), "dtype": row.get("dtype"), "remat": row.get("remat"),
           "steps": row.get("steps")}
    if "error" in row:
        out["error"] = row["error"]
        return out
    peak = row.get("peak_bytes")
    out.update(
        step_ms=1e3 * row["step_s_median"], patches_per_s=row["patches_per_s"], tflops=row["tflops"],
        mfu=row["mfu"], peak_tflops=bench.get("meta", {}).get("peak_tflops"),
        peak_gib=None if peak is None else peak / GIB, peak_source=row.get("peak_source"),
        peak_is_upper_bound=row.get("peak_is_upper_bound"), compile_s=row.get("compile_total_s"),
    )
    return out


def torch_section(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The PyTorch peer's fastest successful variant (its JSON lines), or its error."""
    ok = [r for r in rows if "img_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["img_per_s"])
        return {"variant": best.get("variant"), "batch": best.get("batch"),
                "patches_per_s": best["img_per_s"], "tflops": best.get("tflops"),
                "peak_gib": best.get("peak_gib"), "device": best.get("device"),
                "torch": best.get("torch")}
    errors = [r for r in rows if "error" in r]
    if errors:
        return {"variant": errors[0].get("variant"), "error": errors[0]["error"]}
    return None


def training_section(workdir: str, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    config = read_json(os.path.join(workdir, "config.json"))
    if config is None:
        return None
    records = read_json_lines(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if "train/loss" in r]
    planned = planned_steps(config)
    batch = int(config["train"]["batch_size"])
    done = max((int(r["step"]) for r in train), default=0)
    # The first logged window includes the compile; later windows are the steady rate.
    rates = [r["train/patches_per_second"] for r in train[1:] if "train/patches_per_second" in r]
    stage = stages.get("train", {})
    out = {
        "steps_done": done, "steps_planned": planned, "batch": batch,
        "patches_done": done * batch, "patches_planned": planned * batch,
        "finished": done >= planned,
        "time_limit_s": config["train"].get("time_limit_seconds"),
        "schedule": config["train"].get("schedule"),
        "warmup_steps": config["train"].get("warmup_steps"),
        "aux_epochs": config["train"].get("aux_epochs"),
        "stage_minutes": None if stage.get("seconds") is None else stage["seconds"] / 60.0,
        "patches_per_s_end_to_end": statistics.median(rates) if rates else None,
        "final_loss": train[-1]["train/loss"] if train else None,
        "final_learning_rate": train[-1].get("train/learning_rate") if train else None,
        "final_aux_weight": train[-1].get("train/aux_weight") if train else None,
    }
    return out


def metrics_of(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """F1, object Dice and object Hausdorff of an evaluation report.json."""
    if not report or "metrics" not in report:
        return None
    m = report["metrics"]
    return {"split": report.get("split"), "step": report.get("step"),
            "f1": m.get("f1"), "object_dice": m.get("object_dice"),
            "object_hausdorff": m.get("object_hausdorff"), "pixel_dice": m.get("pixel_dice"),
            "tp": m.get("tp"), "fp": m.get("fp"), "fn": m.get("fn"), "n_images": m.get("num_images")}


def _post_params(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if not config:
        return None
    e = config.get("eval", {})
    return {k: e.get(k) for k in ("threshold", "min_size", "opening_radius", "fill_holes")}


def _target(value: float | None, ok: bool | None) -> str:
    return "not measured" if value is None or ok is None else ("met" if ok else "not met")


def build_summary(out: str, workdir: str) -> dict[str, Any]:
    """Everything the stages wrote, as one dict (the content of summary.json)."""
    stage_list = read_stages(os.path.join(out, "stages.tsv"))
    stages = {s["name"]: s for s in stage_list}
    plan = read_json(os.path.join(out, "plan.json")) or {}
    machine = read_json(os.path.join(out, "machine.json"))
    step = bench_section(read_json(os.path.join(out, "bench.json")))
    peer = torch_section(read_json_lines(os.path.join(out, "torch_baseline.jsonl")))
    training = training_section(workdir, stages)
    config = read_json(os.path.join(workdir, "config.json"))
    best = read_json(os.path.join(out, "tune", "best.json"))
    configured = metrics_of(read_json(os.path.join(workdir, "eval_val", "report.json")))
    if configured is not None:
        configured["postprocess"] = _post_params(config)
    tuned = metrics_of(read_json(os.path.join(out, "eval_val_tuned", "report.json")))
    if tuned is not None and best:
        tuned["postprocess"] = best.get("params")

    ratio = None
    if step and peer and step.get("patches_per_s") and peer.get("patches_per_s"):
        ratio = step["patches_per_s"] / peer["patches_per_s"]
    total_s = None  # From the script's start (plan.json) to the end of the last stage.
    if stage_list:
        first = float(plan["start"]) if plan.get("start") is not None else min(s["start"] for s in stage_list)
        total_s = max(s["start"] + (s["seconds"] or 0.0) for s in stage_list) - first
    failed = [s["name"] for s in stage_list if s["status"] not in ("ok", "skipped")]
    f1 = tuned["f1"] if tuned else None
    peak = step.get("peak_gib") if step else None
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": plan.get("mode"),
        "command": plan.get("command"),
        "config": plan.get("config"),
        "overrides": plan.get("overrides"),
        "workdir": os.path.abspath(workdir),
        "complete": bool(stage_list) and not failed and stages.get("evaluate", {}).get("status") == "ok",
        "failed_stages": failed,
        "total_minutes": None if total_s is None else total_s / 60.0,
        "machine": machine,
        "step_benchmark": step,
        "pytorch_peer": peer,
        "ratio_over_pytorch": ratio,
        "training": training,
        "validation": {"configured_postprocess": configured, "tuned_postprocess": tuned},
        "stages": [{"name": s["name"], "seconds": s["seconds"], "status": s["status"]} for s in stage_list],
        "targets": {
            "step_over_pytorch_at_least_1.3x": _target(ratio, None if ratio is None
                                                       else ratio >= TARGET_RATIO_OVER_PYTORCH),
            "peak_memory_at_most_20_gib": _target(peak, None if peak is None else peak <= TARGET_PEAK_GIB),
            "validation_f1_at_least_paper_test_a_0.913": _target(f1, None if f1 is None
                                                                  else f1 >= PAPER_TEST_A_F1),
            "whole_command_within_10_minutes": _target(total_s, None if total_s is None
                                                       else total_s <= 60 * TARGET_MINUTES),
        },
    }
    if plan.get("mode") == "smoke":
        summary["note"] = ("--smoke: reduced width on the CPU; the figures test the stages, "
                           "they are not results")
        summary["targets"] = {k: "not applicable (--smoke)" for k in summary["targets"]}
    return summary


# ------------------------------------------------------------------------------------- markdown


def _num(v: Any, fmt: str = ".3f", none: str = "not measured") -> str:
    if v is None:
        return none
    if isinstance(v, str):
        return "+inf" if v == "inf" else v  # report.json writes an infinite Hausdorff as "inf".
    if isinstance(v, float) and math.isinf(v):
        return "+inf"
    return format(v, fmt)


def _metrics_cell(m: dict[str, Any] | None) -> tuple[str, str, str]:
    if not m:
        return ("not measured",) * 3
    return _num(m.get("f1")), _num(m.get("object_dice")), _num(m.get("object_hausdorff"), ".2f")


def _post_text(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    return ", ".join(f"{k} {v}" for k, v in p.items() if k != "fill_holes" and v is not None)


def format_markdown(s: dict[str, Any]) -> str:
    m = s.get("machine") or {}
    step, peer, tr = s.get("step_benchmark"), s.get("pytorch_peer"), s.get("training")
    val = s.get("validation") or {}
    lines = [f"# GlaS speedrun summary ({s.get('mode') or 'unknown mode'}, {s['date']})", ""]
    if s.get("note"):
        lines += [f"**{s['note']}**", ""]
    device = (f"{m.get('device_count', '?')} x {m.get('device_kind', '?')} ({m.get('platform', '?')}), "
              f"jax {m.get('jax', '?')}") if m else "not recorded"
    lines += ["| | |", "|---|---|", f"| device | {device} |",
              f"| config | `{s.get('config')}` {' '.join(s.get('overrides') or [])} |"]
    if step and "error" not in step:
        lines.append(
            f"| bare train step (batch {step['batch']}, {step['dtype']}, {step['steps']} steps) | "
            f"{step['patches_per_s']:.3g} patches/s, {step['step_ms']:.1f} ms, "
            f"{step['tflops']:.3g} TFLOP/s, MFU {100 * step['mfu']:.3g}% of "
            f"{_num(step.get('peak_tflops'), 'g')} |")
        peak = _num(step.get("peak_gib"), ".2f") + " GiB"
        if step.get("peak_source") == "xla":
            peak += " (XLA's analysis of the compiled step: this device has no allocator counter)"
        elif step.get("peak_is_upper_bound"):
            peak = "<= " + peak
        lines.append(f"| peak memory (bare step) | {peak} |")
    elif step:
        lines.append(f"| bare train step (batch {step['batch']}) | {step['error']} |")
    else:
        lines.append("| bare train step | not measured |")
    if peer and "error" not in peer:
        lines.append(f"| PyTorch peer ({peer['variant']}, batch {peer['batch']}, same machine) | "
                     f"{peer['patches_per_s']:.3g} patches/s, peak {_num(peer.get('peak_gib'), '.2f')} GiB |")
        lines.append(f"| JAX / PyTorch | {_num(s.get('ratio_over_pytorch'), '.2f')}x |")
    elif peer:
        lines.append(f"| PyTorch peer | failed: {peer['error'][:120]} |")
    else:
        lines.append("| PyTorch peer | not measured |")
    if tr:
        state = "finished" if tr["finished"] else "stopped early (time limit): the schedule did not reach its end"
        lines.append(
            f"| training | {tr['steps_done']:,} of {tr['steps_planned']:,} steps "
            f"({tr['patches_done']:,} patches), {state}; {_num(tr['stage_minutes'], '.2f')} min "
            f"for the stage (start-up, compile and final validation included), "
            f"{_num(tr['patches_per_s_end_to_end'], '.3g')} patches/s end to end |")
    else:
        lines.append("| training | not run |")
    lines.append(f"| whole command | {_num(s.get('total_minutes'), '.2f')} min |")
    n = next((c.get("n_images") for c in (val.get("tuned_postprocess"), val.get("configured_postprocess"))
              if c and c.get("n_images") is not None), None)
    lines += ["", f"Validation split ({n if n is not None else '?'} held-out training images; not Test A/B):", "",
              "| post-processing | F1 | object Dice | object Hausdorff |", "|---|---|---|---|"]
    for label, key in (("configured", "configured_postprocess"), ("tuned on this split", "tuned_postprocess")):
        cell = val.get(key)
        f1, dice, haus = _metrics_cell(cell)
        params = _post_text(cell.get("postprocess")) if cell else ""
        lines.append(f"| {label}{f' ({params})' if params else ''} | {f1} | {dice} | {haus} |")
    lines += ["", f"Paper, Test A: F1 {PAPER_TEST_A_F1}. The tuned row picks its post-processing on the "
              "images it is scored on, so it is optimistic.", "", "| target (issue #17) | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["targets"].items()]
    lines += ["", "| stage | seconds | status |", "|---|---|---|"]
    lines += [f"| {st['name']} | {_num(st['seconds'], '.1f')} | {st['status']} |" for st in s["stages"]]
    if s.get("failed_stages"):
        lines += ["", f"Failed: {', '.join(s['failed_stages'])} (see logs/)."]
    return "\n".join(lines) + "\n"


def summarize(out: str, workdir: str) -> dict[str, Any]:
    """Writes OUT/summary.json and OUT/summary.md, and copies the workdir's small logs into OUT."""
    for name in ("config.json", "metrics.jsonl"):
        src = os.path.join(workdir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, name))
    report = os.path.join(workdir, "eval_val", "report.json")
    if os.path.isfile(report):
        os.makedirs(os.path.join(out, "eval_val_configured"), exist_ok=True)
        shutil.copyfile(report, os.path.join(out, "eval_val_configured", "report.json"))
    s = build_summary(out, workdir)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    text = format_markdown(s)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return s


# ---------------------------------------------------------------------------------- other helpers


def machine_info() -> dict[str, Any]:
    """Devices and library versions of this process (imports JAX and the training stack)."""
    import platform
    from importlib import metadata

    import jax

    devices = jax.devices()
    versions = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "scipy",
                 "scikit-image", "pillow", "grain", "ml_collections", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "device_count": len(devices), "devices": [str(d) for d in devices],
        "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "host_cpu": platform.processor() or platform.machine(), "versions": versions,
    }


def tune_flags(best_json: str) -> list[str]:
    """``--config.eval.KEY=VALUE`` for each post-processing value --mode=tune chose (an unset one,
    such as ``border_min_size`` left at None, keeps the config's default and gets no flag)."""
    best = read_json(best_json)
    if not best or "params" not in best:
        raise SystemExit(f"error: no tuned post-processing in {best_json} (did --mode=tune finish?)")
    return [f"--config.eval.{k}={v}" for k, v in best["params"].items() if v is not None]


def load_with_overrides(spec: str, flags: Sequence[str]) -> Any:
    """A config file with ``--config.KEY=VALUE`` flags applied (as ``micronet_jax.main`` would)."""
    from micronet_jax.config import apply_overrides, load_config_file, parse_value

    config = load_config_file(spec)
    overrides = {}
    for arg in flags:
        key, sep, value = arg.partition("=")
        if not (sep and key.startswith("--config.")):
            raise SystemExit(f"error: expected --config.KEY=VALUE, not {arg!r}")
        overrides[key[len("--config."):]] = parse_value(value)
    try:
        apply_overrides(config, overrides)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    return config


# The time limit counts from the training loop's start, whose first step compiles (a cache hit
# after the benchmark, else ~1 minute at full width); the bare step excludes the input pipeline.
FIT_COMPILE_MARGIN_S = 60.0
FIT_RATE_FACTOR = 0.9


def budget_flags(config: Any, seconds: float, bench: dict[str, Any] | None = None,
                 fit: bool = False) -> tuple[list[str], list[str]]:
    """The training stage's time limit (and, with ``fit``, a smaller step budget), and what it decided.

    The time limit is the smaller of the config's ``train.time_limit_seconds`` and ``seconds``, the
    time the launcher has left for training. ``fit`` shrinks ``train.max_steps`` to what the
    benchmark's bare-step rate (times FIT_RATE_FACTOR, after FIT_COMPILE_MARGIN_S) allows in that
    limit, keeping the schedule's shape: for the per-epoch ("paper") schedule the epochs shrink so that
    the same number of them fits (``train.patches_per_epoch``); otherwise the warm-up stays the same
    fraction of the steps, and the cosine and the auxiliary weight (train.aux_epochs) follow
    total_steps. It never lengthens a run.
    """
    notes = []
    configured = config.train.time_limit_seconds
    limit = float(seconds) if configured is None else min(float(configured), float(seconds))
    if limit < 30:
        notes.append(f"only {seconds:.0f} s left for training: the time limit is raised to 30 s")
        limit = 30.0
    flags = [f"--config.train.time_limit_seconds={limit:.0f}"]
    notes.append(f"training time limit {limit:.0f} s (config {configured}, time left {seconds:.0f} s)")
    if not fit:
        return flags, notes
    planned = planned_steps(config)
    row = bench_section(bench)
    if not row or not row.get("patches_per_s"):
        notes.append("--fit: no bare-step rate was measured; the planned budget is kept")
        return flags, notes
    steps_per_s = FIT_RATE_FACTOR * row["patches_per_s"] / int(config.train.batch_size)
    fits = int(steps_per_s * max(0.0, limit - FIT_COMPILE_MARGIN_S))
    if fits >= planned:
        notes.append(f"--fit: the {planned} planned steps fit in {limit:.0f} s at {steps_per_s:.2f} steps/s")
        return flags, notes
    fits = max(1, fits)
    warmup = int(config.train.warmup_steps)
    if warmup:
        warmup = max(1, round(warmup / max(1, planned) * fits))
    flags += [f"--config.train.max_steps={fits}", f"--config.train.warmup_steps={warmup}"]
    shape = f"warm-up {warmup} steps"
    if config.train.schedule == "paper":
        # The same number of (shorter) epochs, so lr0*10^(-epoch/5) and 1/epoch end where planned.
        epochs, batch = int(config.train.epochs), int(config.train.batch_size)
        patches = -(-fits // epochs) * batch
        flags.append(f"--config.train.patches_per_epoch={patches}")
        shape = f"{epochs} epochs of {patches} patches"
    notes.append(f"--fit: {fits} of the {planned} planned steps fit in {limit:.0f} s at "
                 f"{steps_per_s:.2f} steps/s ({FIT_RATE_FACTOR} x the bare step, "
                 f"{FIT_COMPILE_MARGIN_S:.0f} s for the first step's compile); {shape}")
    return flags, notes


# ------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m micronet_jax.tools.speedrun_summary",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("machine", help="print and write the devices and versions")
    m.add_argument("--json", required=True)
    pl = sub.add_parser("plan", help="write OUT/plan.json (mode, command, config, start time)")
    pl.add_argument("--out", required=True)
    pl.add_argument("--mode", required=True)
    pl.add_argument("--config", required=True)
    pl.add_argument("--start", type=float, required=True)
    pl.add_argument("--command", required=True)
    b = sub.add_parser("budget", help="print the training stage's time-limit (and --fit) flags")
    b.add_argument("--config", required=True)
    b.add_argument("--seconds", type=float, required=True, help="time left for training")
    b.add_argument("--bench", default=None, help="the benchmark's --json (for --fit)")
    b.add_argument("--fit", action="store_true", help="shrink the step budget to the time left")
    t = sub.add_parser("tune-flags", help="print --mode=tune's choice as --config.eval.* flags")
    t.add_argument("best_json")
    s = sub.add_parser("summarize", help="write OUT/summary.json and OUT/summary.md")
    s.add_argument("--out", required=True)
    s.add_argument("--workdir", required=True)
    args, rest = p.parse_known_args(argv)
    if rest and args.cmd not in ("budget", "plan"):
        p.error(f"unrecognized arguments: {' '.join(rest)}")

    if args.cmd == "machine":
        info = machine_info()
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=2)
        print(f"devices: {info['device_count']} x {info['device_kind']} ({info['platform']})")
        for d in info["devices"]:
            print(f"  {d}")
        print("python " + info["python"] + ", " + ", ".join(
            f"{k} {v}" for k, v in info["versions"].items() if v is not None))
    elif args.cmd == "plan":
        os.makedirs(args.out, exist_ok=True)
        plan = {"mode": args.mode, "config": args.config, "overrides": [a for a in rest if a != "--"],
                "start": args.start, "command": args.command}
        with open(os.path.join(args.out, "plan.json"), "w") as fh:
            json.dump(plan, fh, indent=2)
    elif args.cmd == "budget":
        config = load_with_overrides(args.config, rest)
        flags, notes = budget_flags(config, args.seconds, read_json(args.bench) if args.bench else None,
                                    fit=args.fit)
        for note in notes:
            print(note, file=sys.stderr)
        print("\n".join(flags))
    elif args.cmd == "tune-flags":
        print("\n".join(tune_flags(args.best_json)))
    else:
        summary = summarize(args.out, args.workdir)
        print(format_markdown(summary))
        print(f"wrote {os.path.join(args.out, 'summary.json')} and summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
