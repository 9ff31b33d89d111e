"""The command line: ``python -m micronet_jax.main --config configs/NAME.py [--config.a.b=v] --mode=MODE``.

Modes:
  summary   print the layer table, parameter count, FLOPs and memory without allocating weights
  train     train (or resume) in --workdir, then validate and write reports
  evaluate  score a checkpoint on a split with the GlaS metrics (report.json, per_image.csv, table)
  predict   segment the images or whole slides in --input: label PNGs, overlays and a CSV per folder of
            images; QuPath GeoJSON, a glands CSV, an overlay (and a probability OME-TIFF) per slide
  tune      choose post-processing constants on the validation split (never on Test A/B)

Examples:
  python -m micronet_jax.main --config configs/default.py --workdir runs/default
  python -m micronet_jax.main --config configs/glas_508.py --config.data.root=/data/GlaS --workdir runs/glas
  python -m micronet_jax.main --config configs/glas_508.py --config.data.root=/data/GlaS --mode=evaluate --checkpoint runs/glas --config.eval.split=testA
  python -m micronet_jax.main --config configs/default.py --mode=predict --checkpoint runs/default --input slide.svs --output out/
  python -m micronet_jax.main --config configs/glas_cpu.py --config.data.root=/data/GlaS --mode=evaluate --checkpoint runs/s0 --checkpoint runs/s1 --output runs/ensemble
Every config key is listed, with its default and reason, in micronet_jax/config.py.
"""
# This file only parses flags and hands over; everything else is importable without flags.

from __future__ import annotations

import signal
import sys

from absl import app, flags

from micronet_jax import cli

_CONFIG = cli.define_config_flag()
_MODE = flags.DEFINE_enum(
    "mode", "train", ["summary", "train", "evaluate", "predict", "tune"],
    "summary: layer table, FLOPs and memory; train: train/resume in --workdir; evaluate: GlaS metrics of a "
    "checkpoint on --config.eval.split; predict: segment the images in --input; tune: choose the "
    "post-processing threshold, minimum size and opening on the validation split.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Run directory: checkpoints, config.json, metrics.jsonl, TensorBoard events, reports. A workdir "
    "that already holds checkpoints is resumed.",
)
_CHECKPOINT = flags.DEFINE_multi_string(
    "checkpoint", None,
    "evaluate/predict/tune: a workdir (its best checkpoint, else its latest), one checkpoint step "
    "folder, or an ablation run folder (runs/<variant>/seed_<s>). Defaults to --workdir. Given "
    "several times (seeds or folds of one model config), their probabilities are averaged: an "
    "ensemble, whose results need --output.",
)
_INPUT = flags.DEFINE_string(
    "input", None,
    "predict: a whole-slide file (SVS, tiled/pyramidal TIFF, OME-TIFF; others with openslide) or a folder "
    "of slides and/or ordinary images (any size; PNG/BMP/TIFF/JPEG).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "evaluate/predict: where to write results (default: WORKDIR/eval_SPLIT or WORKDIR/predict)."
)


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses flags, turning a bad config override or config file into one line that names it."""
    argv = cli.with_fractions(argv)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        cli.exit_with(cli.describe_flag_error(e, argv))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/default.py")
    try:
        config.get("platform")
    except OSError as e:  # ml_collections defers a failed config-file load to first access.
        cli.exit_with(f"could not load --config: {str(e).splitlines()[-1].strip()}")
    # A command line's own process: a CPU run may restart itself once with huge pages (config.py).
    cli.use_platform(config, restart=_MODE.value != "summary")
    cli.run_guarded(_run_mode, config)


def _run_mode(config) -> None:
    """Dispatches on --mode; errors caused by bad input surface as one message (see main)."""
    if _MODE.value == "summary":
        from micronet_jax.models import build_model
        from micronet_jax.models.summary import format_summary

        print(format_summary(build_model(config.model)))
        return

    if _MODE.value == "train":
        if not _WORKDIR.value:
            raise app.UsageError("--workdir is required for --mode=train")
        from micronet_jax import train

        result = train.train_and_evaluate(config, _WORKDIR.value)
        if result["stopped_by"] in ("SIGTERM", "SIGINT"):
            print(f"stopped by {result['stopped_by']} at step {result['step']}; rerun the same command "
                  "to resume", file=sys.stderr)
            # The exit status of a process killed by that signal, which schedulers already expect.
            sys.exit(128 + signal.Signals[result["stopped_by"]].value)
        return

    from micronet_jax import evaluate

    checkpoints = _CHECKPOINT.value or ([_WORKDIR.value] if _WORKDIR.value else [])
    if not checkpoints:
        raise app.UsageError(f"--checkpoint (or --workdir) is required for --mode={_MODE.value}")
    if len(checkpoints) > 1 and not _OUTPUT.value:
        raise app.UsageError(f"--output is required with several --checkpoint (an ensemble of "
                             f"{len(checkpoints)}): its results have no workdir of their own")
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else checkpoints
    if _MODE.value == "evaluate":
        evaluate.evaluate_checkpoint(config, checkpoint, output_dir=_OUTPUT.value)
    elif _MODE.value == "tune":
        evaluate.tune_checkpoint(config, checkpoint, output_dir=_OUTPUT.value)
    else:
        if not _INPUT.value:
            raise app.UsageError("--input (a slide, or a folder of images or slides) is required for --mode=predict")
        evaluate.predict(config, checkpoint, _INPUT.value, output_dir=_OUTPUT.value)


def run() -> None:
    """Console entry point."""
    cli.setup_logging()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
