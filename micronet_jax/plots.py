"""PNG plots made from the run's own logs (matplotlib, headless)."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first.


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(metrics_path: str, out_path: str) -> None:
    """Training loss (left) and validation object F1 / object Dice (right) against the step."""
    records = read_jsonl(metrics_path)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/f1" in r]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["train/loss"] for r in train], label="total")
        ax_loss.plot(steps, [r["train/loss_main"] for r in train], label="main output")
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="weighted cross-entropy", title="training loss")
    ax_loss.legend()
    if val:
        steps = [r["step"] for r in val]
        for key, label in (("val/f1", "object F1"), ("val/object_dice", "object Dice")):
            values = [r[key] if isinstance(r[key], (int, float)) else math.nan for r in val]
            ax_val.plot(steps, values, marker="o", label=label)
        ax_val.set_ylim(0, 1)
    ax_val.set(xlabel="step", title="validation (pooled GlaS metrics)")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
