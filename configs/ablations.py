"""Functional ablations of Micro-Net: named variants as small deltas on a base config.

Each variant is a dict of dotted config overrides applied on top of a *sweep*'s base config, so the
difference between two rows of an ablation table is exactly the keys listed here and nothing else:

* sweep ``cpu``: ``configs/default.py`` (synthetic glands, width 1/16, float32, CPU);
* sweep ``glas``: ``configs/glas_508.py`` (the paper's recipe on GlaS, full width, bfloat16, one GPU).

One variant as an ordinary training run (``ARG`` = ``VARIANT`` or ``VARIANT,base=SWEEP``)::

    python -m micronet_jax.main --config configs/ablations.py:minus --workdir runs/minus
    python -m micronet_jax.main --config configs/ablations.py:minus,base=glas \\
        --config.data.root=/path/to/GlaS --workdir runs/glas_minus

A whole sweep, several seeds per variant trained together in one vmapped step, is
``python -m micronet_jax.ablation`` (see docs/ablations.md); it reads :data:`VARIANTS`,
:data:`SWEEPS` and :func:`variant_config` from this file.

Variants whose overrides touch only ``eval.*`` (:func:`is_eval_only`) change nothing in training; the
sweep runner evaluates them with the *baseline*'s trained weights of the same seed instead of
retraining, so their difference from the baseline is the post-processing / TTA effect alone.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from micronet_jax.config import apply_overrides, load_config_file

_HERE = os.path.dirname(os.path.abspath(__file__))

# variant name -> dotted overrides relative to the sweep's base. Comments say what the switch tests.
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},  # Micro-Net as configured by the sweep's base (the paper's recipe for glas).
    "minus": {"model.multires": False},  # Micro-Net-minus: no resized-input branches (spec §6, §7.21).
    "no_aux": {"train.aux_loss": False},  # Main-output loss only; the aux heads get no gradient.
    "no_weight_map": {"data.weight_map.enabled": False},  # Plain (unweighted) cross-entropy.
    "no_augment": {"data.augment.enabled": False},  # Random crops only.
    "stain_jitter": {"data.augment.stain_jitter": 0.1},  # Paper augmentation + H&E colour jitter.
    "relu": {"model.activation": "relu"},  # ReLU instead of the paper's tanh.
    "batch_norm": {"model.batch_norm": True},  # TIAToolbox's BatchNorm in B1..B4 (spec §7.5).
    # Three classes (background, gland interior, boundary band) and a marker-controlled watershed,
    # to separate touching glands (docs/accuracy.md). Not in the paper.
    "contour": {"data.target": "contour", "model.num_classes": 3},
    # The same with the sixth round's watershed seeds: p(interior) smoothed by 4 px, seeds of at least
    # 1000 px, so a noisy interior does not fragment one gland (docs/accuracy.md, GlaS-sized glands).
    "contour_seeds": {"data.target": "contour", "model.num_classes": 3,
                      "eval.min_marker_size": 1000, "eval.marker_sigma": 4.0},
    # Half resolution: a 508 patch sees four times the tissue (docs/accuracy.md). Not in the paper.
    "half_scale": {"data.scale": 0.5, "data.patch_size": 508},
    # Crops and tiles standardised with their whole image's statistics, not their own (docs/accuracy.md).
    "image_normalize": {"data.normalize": "image"},
    # An exponential moving average of the weights over ~1,000 steps, validated instead of the last
    # step's weights (docs/accuracy.md, thirteenth round). Not in the paper.
    "ema": {"train.ema_decay": 0.999},
    # Three times the U-Net weight on the background between neighbouring glands (docs/accuracy.md,
    # fifteenth round). The paper's w0 is 10.
    "w0_30": {"data.weight_map.w0": 30.0},
    # Training labels with the gaps between neighbouring glands widened to about 3 px, so a two-class
    # output can learn to keep them apart (docs/accuracy.md, fifteenth round). Not in the paper.
    "gap_width": {"data.gap_width": 3},
    # No dropout before the heads (the paper's 0.5): adopted by the CPU recipe (docs/accuracy.md,
    # fourteenth round).
    "no_dropout": {"model.dropout": 0.0},
    # Merged glands split by a watershed on p(gland) seeded by its regions above 0.7 of at least
    # 8000 px, GlaS-sized glands (docs/accuracy.md, seventeenth round; in the CPU recipe). Eval only.
    "pp_split": {"eval.split_threshold": 0.7, "eval.min_marker_size": 8000},
    "bf16": {"model.dtype": "bfloat16"},  # bfloat16 compute (a no-op for glas, whose base is bf16).
    "fp32": {"model.dtype": "float32"},  # float32 compute (a no-op for cpu, whose base is fp32).
    "tta": {"eval.tta": True},  # 8-way flip/rot90 test-time augmentation (eval only).
    "pp_open2": {"eval.opening_radius": 2},  # Binary opening, disk radius 2 (eval only).
    "pp_min100": {"eval.min_size": 100},  # Keep smaller objects (eval only).
    "pp_min500": {"eval.min_size": 500},  # Drop more small objects (eval only).
}

# sweep name -> base config file (in configs/) and the variants run when --variants is not given.
# Each default list leaves out the dtype variant that equals its base.
SWEEPS: dict[str, dict[str, Any]] = {
    "cpu": {
        "base": "default.py",
        "default_variants": [v for v in VARIANTS if v != "fp32"],
    },
    "glas": {
        "base": "glas_508.py",
        "default_variants": [v for v in VARIANTS if v != "bf16"],
    },
}

BASELINE = "baseline"


def is_eval_only(variant: str) -> bool:
    """True when the variant changes only evaluation keys, so baseline weights can be reused."""
    overrides = VARIANTS[variant]
    return bool(overrides) and all(k.startswith("eval.") for k in overrides)


def base_config(sweep: str = "cpu") -> ml_collections.ConfigDict:
    """The sweep's base config, loaded from its file in ``configs/`` (configs are not a package)."""
    if sweep not in SWEEPS:
        raise ValueError(f"unknown sweep {sweep!r}; expected one of {', '.join(SWEEPS)}")
    return load_config_file(os.path.join(_HERE, SWEEPS[sweep]["base"]))


def variant_config(
    variant: str, sweep: str = "cpu", overrides: dict[str, Any] | None = None, base: str | None = None
) -> ml_collections.ConfigDict:
    """Base of ``sweep`` (or the config file ``base``, ``FILE[:ARG]``), then ``overrides`` (e.g. from
    the command line), then the variant's delta.

    The variant comes last so that a command-line change (say a smaller width) applies to every
    variant alike and never erases the one switch a variant is about.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown ablation variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    config = load_config_file(base) if base else base_config(sweep)
    apply_overrides(config, overrides or {})
    apply_overrides(config, VARIANTS[variant])
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/ablations.py:VARIANT[,base=SWEEP]`` for ``micronet_jax.main``; default baseline, cpu."""
    parts = [p.strip() for p in (arg or BASELINE).split(",") if p.strip()]
    variant, sweep = BASELINE, "cpu"
    for p in parts:
        if p.startswith("base="):
            sweep = p.split("=", 1)[1]
        else:
            variant = p
    return variant_config(variant, sweep)
