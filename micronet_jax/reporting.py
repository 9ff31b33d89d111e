"""Reporting, apart from the loops that produce the numbers: metric logs, result tables, plots.

* :class:`MetricWriter`: the trainer's ``metrics.jsonl`` and TensorBoard scalars/images (process 0);
* :func:`write_training_plot`: ``training_curves.png`` from ``metrics.jsonl``;
* the ablation sweep's ``results.csv`` / ``results.md`` / ``results.png`` (:func:`write_results`) and
  the atomic JSON writer its run records use (:func:`write_json`).

Evaluation reports of one split (``report.json``, ``report.md``, ``per_image.csv``) stay with the
evaluator (:func:`micronet_jax.evaluate.write_report`), which owns their columns.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from micronet_jax.evaluate import json_scalar

logger = logging.getLogger(__name__)

# Validation metrics carried into the ablation's results.csv, in this order.
VAL_METRICS = ("f1", "object_dice", "object_hausdorff", "pixel_dice")
CSV_COLUMNS = (
    "variant", "seed", "steps", "train_seconds", "final_train_loss", *VAL_METRICS,
    "precision", "recall", "finite", "eval_seconds", "compile_seconds", "trained_with", "weights_from",
)
# Metrics summarised in results.md; lower is better only for Hausdorff and loss.
SUMMARY_METRICS = (*VAL_METRICS, "final_train_loss", "train_seconds")
# Loss reported as "final": mean over this many last steps (one step's loss is a noisy number).
FINAL_LOSS_WINDOW = 10


# ------------------------------------------------------------------------------ training logs


class MetricWriter:
    """metrics.jsonl plus TensorBoard scalars and images, written by process 0 only."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_records_after(path, resume_step)
        self._jsonl = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # The GPU image may lack tensorboardX; jsonl still has everything.
            logger.warning("tensorboardX is not installed: no TensorBoard events are written")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{f"{prefix}{k}": json_scalar(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                v = json_scalar(v)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}{k}", v, int(step))

    def images(self, step: int, images: dict[str, np.ndarray]) -> None:
        if self.enabled and self._tb is not None:
            for name, img in images.items():
                self._tb.add_image(name, img, int(step), dataformats="HWC")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
    """On resume, forgets what a killed run logged after its last checkpoint: those steps are
    trained (and logged) again, and the log should read like one uninterrupted run."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def write_training_plot(workdir: str) -> None:
    """training_curves.png from metrics.jsonl (loss and validation F1 against step)."""
    try:
        from micronet_jax.plots import plot_training_curves
    except ImportError:  # matplotlib is optional on accelerator images; metrics.jsonl has the data.
        logger.warning("matplotlib is not installed: training_curves.png is not written")
        return
    plot_training_curves(os.path.join(workdir, "metrics.jsonl"),
                         os.path.join(workdir, "training_curves.png"))


# ------------------------------------------------------------------------------ ablation results


def write_json(path: Path, obj: Any) -> None:
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


def as_float(v: Any) -> float:
    return math.inf if v == "inf" else (math.nan if v in (None, "") else float(v))


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
        out[v] = {m: (*_mean_std([as_float(r[m]) for r in vr]), len(vr)) for m in SUMMARY_METRICS}
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
            seed_values = [as_float(r[m]) for r in rows if r["variant"] == v]
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
