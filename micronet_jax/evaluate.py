"""Whole-image evaluation and prediction: tiled inference -> post-processing -> GlaS metrics -> reports.

The same :func:`evaluate_examples` serves validation during training, ``--mode=evaluate`` and (without
ground truth) ``--mode=predict``, so a number seen during training is the number the evaluator gives.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from micronet_jax import checkpointing, ensemble, infer, metrics, postprocess, visualize
from micronet_jax.core import jit_tile_forward, make_forward_fn
from micronet_jax import slide as wsi_slide
from micronet_jax.data import resample
from micronet_jax.config import check_normalize, config_value
from micronet_jax.data.readers import IMAGE_EXTENSIONS, DataError, read_image
from micronet_jax.inputs import moments, standardize, standardize_with
from micronet_jax.models import MicroNet, build_model
from micronet_jax.models.summary import abstract_variables

logger = logging.getLogger(__name__)

# The paper's GlaS results (spec §6). F1 is verified from the paper's table; object Dice and
# Hausdorff are marked unverified in the spec and are shown as such.
PAPER_RESULTS = {
    "testA": {"f1": 0.913, "object_dice": 0.906, "object_hausdorff": 49.15},
    "testB": {"f1": 0.724, "object_dice": 0.785, "object_hausdorff": 133.98},
}


def predict_probabilities(
    forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, eval_config, tile: int,
    scale: float = 1.0,
    normalize: str = "crop",
) -> np.ndarray:
    """Class probabilities (H, W, C) for one uint8 RGB image of any size.

    The image is resampled by ``scale`` (``data.scale``, as in training) and the probabilities back
    to (H, W). ``normalize`` is ``data.normalize``, as in training: "crop" standardises each tile
    on its own, as training standardises each crop; "image" standardises every tile with the
    resampled image's mean and std, as training standardises each crop with its image's. Either
    way the network sees the input statistics it was trained on (docs/accuracy.md).
    """
    small = resample.rescale_image(image, scale)
    check_normalize(normalize)
    if normalize == "image":
        stats = moments(small)
        preprocess = lambda tile_image: standardize_with(tile_image, *stats)  # noqa: E731
    else:
        preprocess = standardize
    prob = infer.tiled_predict(
        forward,
        small,
        tile=tile,
        margin=int(eval_config.margin),
        stitch=str(eval_config.stitch),
        tile_batch=int(eval_config.tile_batch),
        tta=bool(eval_config.tta),
        preprocess=preprocess,
    )
    return resample.resize_probabilities(prob, image.shape[:2])


def _normalize(config: ml_collections.ConfigDict) -> str:
    """``data.normalize`` of a full config (its default where an older config lacks the key)."""
    return str(config_value(config.data, "normalize", "data"))


def to_instances(prob: np.ndarray, eval_config) -> np.ndarray:
    """Class probabilities -> instance labels with the configured post-processing (spec §5).

    Two classes: threshold p(gland) and connected components (or a watershed: ``eval.split_distance``,
    ``eval.split_threshold``). Three (``data.target=contour``):
    the marker-controlled watershed of :func:`postprocess.contour_to_instances`.
    """
    common = dict(
        threshold=float(eval_config.threshold),
        fill_holes=bool(eval_config.fill_holes),
        opening_radius=int(eval_config.opening_radius),
        min_size=int(eval_config.min_size),
        border_min_size=eval_config.get("border_min_size"),
    )
    if prob.shape[-1] == 3:
        return postprocess.contour_to_instances(
            prob, marker_threshold=float(eval_config.marker_threshold),
            min_marker_size=int(eval_config.min_marker_size),
            marker_sigma=float(eval_config.marker_sigma),
            merge_threshold=float(eval_config.get("merge_threshold", 0.0)), **common,
        )
    return postprocess.probability_to_instances(
        prob[..., 1], split_distance=float(eval_config.split_distance),
        split_threshold=float(eval_config.get("split_threshold", 0.0)),
        marker_sigma=float(eval_config.marker_sigma), min_marker_size=int(eval_config.min_marker_size),
        **common)


def evaluate_examples(
    forward: Callable[[np.ndarray], np.ndarray],
    examples: Sequence[Any],
    eval_config: ml_collections.ConfigDict,
    tile: int,
    *,
    overlay_dir: str | None = None,
    progress: bool = True,
    scale: float = 1.0,
    normalize: str = "crop",
) -> dict[str, Any]:
    """Segments and scores ``examples`` (``.image``, ``.label``, ``.name``).

    Returns ``{"summary": pooled GlaS metrics, "per_image": rows, "predictions": label images,
    "seconds": wall time}``. Each image is scored once; the summary pools those same stats.
    """
    start = time.perf_counter()
    preds, stats, rows = [], [], []
    n_overlays = int(eval_config.num_overlays)
    for i, ex in enumerate(tqdm(examples, desc="evaluate", unit="img", disable=not progress)):
        pred = to_instances(
            predict_probabilities(forward, ex.image, eval_config, tile, scale, normalize), eval_config)
        preds.append(pred)
        s = metrics.image_stats(pred, ex.label)
        stats.append(s)
        rows.append({"name": ex.name, **metrics.per_image_row(s),
                     "gt_objects": s["n_gt"], "pred_objects": s["n_pred"]})
        if overlay_dir and i < n_overlays:
            visualize.save_png(
                os.path.join(overlay_dir, f"{ex.name}_overlay.png"),
                visualize.overlay_outlines(ex.image, pred, ex.label),
            )
    return {
        "summary": metrics.aggregate_stats(stats),
        "per_image": rows,
        "predictions": preds,
        "seconds": time.perf_counter() - start,
    }


def _write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """One CSV with the first row's keys as the header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(out_dir: str, split: str, result: dict[str, Any], extra: dict[str, Any]) -> None:
    """Writes report.json (pooled metrics), per_image.csv and report.md (beside the paper)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = {k: json_scalar(v) for k, v in result["summary"].items()}
    report = {"split": split, "aggregation": "pooled", **extra, "metrics": summary,
              "seconds": round(result["seconds"], 3)}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    rows = result["per_image"]
    if rows:
        _write_csv(os.path.join(out_dir, "per_image.csv"), rows)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown_table(split, result["summary"], len(rows)))


def markdown_table(split: str, summary: dict[str, Any], n_images: int) -> str:
    """Our pooled metrics beside the paper's Test A and Test B numbers."""
    lines = [
        f"# GlaS metrics on `{split}` ({n_images} images, pooled as in the challenge)",
        "",
        "| | F1 | Object Dice | Object Hausdorff |",
        "|---|---|---|---|",
        f"| this run, {split} | {summary['f1']:.3f} | {summary['object_dice']:.3f} | "
        f"{format_hausdorff(summary['object_hausdorff'])} |",
    ]
    for part, paper in PAPER_RESULTS.items():
        lines.append(
            f"| paper, {part} | {paper['f1']:.3f} | {paper['object_dice']:.3f}* | "
            f"{paper['object_hausdorff']:.2f}* |"
        )
    lines += [
        "",
        f"TP {summary['tp']}, FP {summary['fp']}, FN {summary['fn']}; pixel Dice "
        f"{summary['pixel_dice']:.3f}. Paper F1 values are verified from its table; the values "
        "marked * are unverified (micronet_spec.md §6). Only Test A/B numbers are comparable with "
        "the paper; a validation split of the training images is not.",
    ]
    if all(k in summary for k in metrics.ERROR_KINDS):
        lines.append(
            f"FN by kind: missed {summary['fn_missed']}, merged into a neighbour's object "
            f"{summary['fn_merged']}, under-covered {summary['fn_undercovered']}; FP by kind: on "
            f"background {summary['fp_background']}, fragment of a matched gland "
            f"{summary['fp_fragment']}, over an unmatched gland {summary['fp_unmatched']} "
            "(metrics.py: _error_kinds; per_image.csv has them by image).")
    if summary.get("num_empty_pred"):
        lines.append(f"{summary['num_empty_pred']} image(s) had an empty prediction (Hausdorff +inf).")
    return "\n".join(lines) + "\n"


def format_hausdorff(h: float) -> str:
    """Two decimals, or "+inf" when an image had no prediction or no ground truth (glas_metrics.md)."""
    return "+inf" if math.isinf(h) else f"{h:.2f}"


def json_scalar(v: Any) -> Any:
    """A metric value as plain JSON: numpy/JAX scalars become Python numbers, and +inf (the
    Hausdorff distance of an empty side) the string "inf", which JSON cannot hold as a number."""
    if isinstance(v, (np.ndarray, jax.Array)):
        v = v.item()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return v


Checkpoints = str | Sequence[str]


def load_for_inference(
    config: ml_collections.ConfigDict, checkpoint: Checkpoints
) -> tuple[MicroNet | ensemble.Ensemble, Any, int | list[int]]:
    """The model and its restored variables (single device) from a workdir or step folder; given
    several, an :class:`~micronet_jax.ensemble.Ensemble` of them, its variables stacked and its step
    the list of the members' steps."""
    paths = _paths(checkpoint)
    model = build_model(config.model)
    target = abstract_variables(model)
    members, steps = [], []
    for path in paths:
        variables, step = checkpointing.restore_variables(
            path, config.model, target, weights=str(config.eval.weights))
        logger.info("restored checkpoint step %d from %s", step, path)
        members.append(variables)
        steps.append(step)
    if len(paths) == 1:
        return model, members[0], steps[0]
    return ensemble.Ensemble(model, len(paths)), ensemble.stack(members), steps


def _paths(checkpoint: Checkpoints) -> list[str]:
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else [str(p) for p in checkpoint]
    if not paths:
        raise ValueError("no checkpoint given")
    return paths


def _output_dir(checkpoint: Checkpoints, output_dir: str | os.PathLike | None, name: str) -> str:
    """``output_dir``, else ``name`` inside the one checkpoint's folder; an ensemble has no folder of
    its own, so it needs one named."""
    if output_dir:
        return str(output_dir)
    paths = _paths(checkpoint)
    if len(paths) > 1:
        raise ValueError(f"several checkpoints ({', '.join(paths)}) need --output: an ensemble's "
                         "results have no workdir of their own")
    return os.path.join(paths[0], name)


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, checkpoint: Checkpoints, output_dir: str | None = None
) -> dict[str, Any]:
    """``--mode=evaluate``: scores ``config.eval.split`` and writes the reports and overlays (of the
    mean probability of several checkpoints, when given several)."""
    from micronet_jax.data import load_split

    split = str(config.eval.split)
    out = _output_dir(checkpoint, output_dir, f"eval_{split}")
    model, variables, step = load_for_inference(config, checkpoint)
    examples = load_split(config.data, split)
    if config.eval.max_images:
        examples = examples[: int(config.eval.max_images)]
    result = evaluate_examples(
        make_forward_fn(model, variables), examples, config.eval, model.variant,
        overlay_dir=os.path.join(out, "overlays"), scale=float(config.data.scale),
        normalize=_normalize(config),
    )
    paths = [os.path.abspath(p) for p in _paths(checkpoint)]
    write_report(out, split, result, {"checkpoint": paths[0] if len(paths) == 1 else paths, "step": step,
                                       "tta": bool(config.eval.tta),
                                       "weights": str(config.eval.weights)})
    s = result["summary"]
    print(f"{split}: F1 {s['f1']:.4f}  object Dice {s['object_dice']:.4f}  object Hausdorff "
          f"{format_hausdorff(s['object_hausdorff'])}  ({len(examples)} image{'' if len(examples) == 1 else 's'}, {result['seconds']:.1f} s) -> {out}")
    return result


def list_images(folder: str) -> list[Path]:
    """Image files of a folder, naturally sorted; masks named *_anno are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--input folder does not exist: {root}")
    files = sorted(
        (p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith("_anno")),
        key=lambda p: p.name,
    )
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in --input folder {root}")
    return files


def split_inputs(input_path: str) -> tuple[list[Path], list[Path]]:
    """(ordinary images, whole slides) of ``--input``: a folder of either or both, or one file."""
    p = Path(input_path)
    if p.is_file():
        return ([], [p]) if wsi_slide.is_slide_file(p) or p.suffix.lower() not in IMAGE_EXTENSIONS else ([p], [])
    if not p.is_dir():
        raise DataError(f"--input does not exist: {p}")
    slide_files = sorted((q for q in p.iterdir() if q.is_file() and wsi_slide.is_slide_file(q)),
                         key=lambda q: q.name)
    images = [q for q in list_images(input_path)] if not slide_files else [
        q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and not q.stem.endswith("_anno")
        and q not in slide_files]
    return sorted(images, key=lambda q: q.name), slide_files


def predict(
    config: ml_collections.ConfigDict, checkpoint: Checkpoints, input_path: str,
    output_dir: str | None = None
) -> dict[str, Any]:
    """``--mode=predict``: ordinary images through :func:`predict_folder`, whole slides (SVS, tiled or
    pyramidal TIFF, OME-TIFF, ...) through :func:`micronet_jax.wsi.predict_slide`, one folder each."""
    from micronet_jax import wsi

    images, slide_files = split_inputs(input_path)
    out = wsi.check_output_dir(_output_dir(checkpoint, output_dir, "predict"))
    result: dict[str, Any] = {}
    if images:
        result["images"] = predict_folder(config, checkpoint, images, out)
    if slide_files:
        model, variables, _ = load_for_inference(config, checkpoint)
        compiled = jit_tile_forward(model)
        # Not awaited here: wsi collects a region's logits after dispatching the next region.
        forward = lambda tiles: compiled(variables, jnp.asarray(tiles, jnp.float32))  # noqa: E731
        result["slides"] = {}
        for path in slide_files:
            s = wsi.predict_slide(config, forward, path, out / path.name.split(".")[0], tile=model.variant)
            result["slides"][path.name] = s
            print(f"{path.name}: {s['glands']} glands, {s['tiles_run']} tiles, {s['seconds']:.1f} s "
                  f"({s['megapixels_per_second']} slide Mpx/s) -> {out / path.name.split('.')[0]}")
    return result


def predict_folder(
    config: ml_collections.ConfigDict, checkpoint: Checkpoints, input_dir: str | Sequence[Path],
    output_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Ordinary images: label PNGs, overlays and a CSV of gland counts and areas per image.

    ``input_dir`` is a folder or a list of image files.
    """
    files = list_images(input_dir) if isinstance(input_dir, (str, os.PathLike)) else list(input_dir)
    model, variables, _ = load_for_inference(config, checkpoint)
    forward = make_forward_fn(model, variables)
    out = Path(_output_dir(checkpoint, output_dir, "predict"))
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    for path in tqdm(files, desc="predict", unit="img"):
        image = read_image(path)
        labels = to_instances(
            predict_probabilities(forward, image, config.eval, model.variant, float(config.data.scale),
                                  _normalize(config)),
            config.eval,
        )
        # 16-bit PNG so images with more than 255 glands keep their ids.
        visualize.save_png(out / "labels" / f"{path.stem}.png", labels.astype(np.uint16))
        visualize.save_png(out / "overlays" / f"{path.stem}_overlay.png",
                           visualize.overlay_outlines(image, labels))
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        rows.append({
            "image": path.name, "height": image.shape[0], "width": image.shape[1],
            "glands": int(len(areas)), "total_area_px": int(areas.sum()),
            "mean_area_px": float(areas.mean()) if len(areas) else 0.0,
            "areas_px": " ".join(str(int(a)) for a in areas),
        })
    _write_csv(out / "glands.csv", rows)
    print(f"predicted {len(rows)} images -> {out}")
    return rows


# Grid of the post-processing tuner (``--mode=tune``); spec §7.17: tune on validation images only.
TUNE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
TUNE_MIN_SIZES = (0, 50, 100, 200, 300, 500, 800, 1200, 2000, 3000)
TUNE_OPENING_RADII = (0, 2, 3)
TUNE_MARKER_THRESHOLDS = (0.4, 0.5, 0.6, 0.7)  # data.target=contour only
TUNE_SPLIT_DISTANCES = (0, 12, 24)  # two classes only (0 = connected components)
# Two classes with eval.split_threshold > 0 (searched instead of the neck split, with the config's own
# value added): the watershed's seeds on p(gland); 0 = connected components, so the tuner also says
# whether the split helps on these images at all.
TUNE_SPLIT_THRESHOLDS = (0.0, 0.6, 0.7, 0.8, 0.9)
TUNE_BORDER_MIN_SIZES = (None, 300, 1000)  # objects touching the image's frame (None = min_size)


def tune_checkpoint(
    config: ml_collections.ConfigDict, checkpoint: Checkpoints, output_dir: str | None = None
) -> dict[str, Any]:
    """``--mode=tune``: picks threshold, minimum object size (also for objects touching the image's
    frame), opening and the neck split or watershed seeds on the validation split.

    Refuses the test splits, so Test A/B stay untouched by model selection. Writes ``tuning.csv``
    (every grid point) and ``best.json``, and prints the overrides to pass to ``--mode=evaluate``.
    """
    from micronet_jax.data import load_split

    split = str(config.eval.split)
    if split not in ("val", "train"):
        raise ValueError(
            f"config eval.split={split!r}: post-processing is tuned on the validation split only "
            "(--config.eval.split=val); Test A/B are for the final, independent scoring"
        )
    out = _output_dir(checkpoint, output_dir, f"tune_{split}")
    model, variables, step = load_for_inference(config, checkpoint)
    examples = load_split(config.data, split)
    if config.eval.max_images:
        examples = examples[: int(config.eval.max_images)]
    # The forward pass once per image; the grid then only re-runs the post-processing.
    forward = make_forward_fn(model, variables)
    probabilities = [
        predict_probabilities(forward, ex.image, config.eval, model.variant, float(config.data.scale),
                              _normalize(config))
        for ex in tqdm(examples, desc="predict", unit="img")
    ]
    # Two classes: tune on p(gland); three: on the whole map, with the watershed's seed threshold.
    # With eval.split_threshold > 0 (two classes) its seeds' threshold is searched instead of the
    # neck split; their least size and smoothing are held at the config's values.
    split_threshold = float(config.eval.get("split_threshold", 0.0))
    split_thresholds = tuple(sorted({*TUNE_SPLIT_THRESHOLDS, split_threshold})) if split_threshold > 0 else (0.0,)
    probabilities = [p[..., 1] if p.shape[-1] == 2 else p for p in probabilities]
    best, rows = postprocess.tune_postprocess(
        probabilities, [ex.label for ex in examples],
        TUNE_THRESHOLDS, TUNE_MIN_SIZES, TUNE_OPENING_RADII, fill_holes=bool(config.eval.fill_holes),
        marker_thresholds=TUNE_MARKER_THRESHOLDS, min_marker_size=int(config.eval.min_marker_size),
        split_distances=(0,) if split_threshold > 0 else TUNE_SPLIT_DISTANCES,
        marker_sigma=float(config.eval.marker_sigma),
        merge_threshold=float(config.eval.get("merge_threshold", 0.0)), split_thresholds=split_thresholds,
        workers=config.eval.get("tune_workers"), border_min_sizes=TUNE_BORDER_MIN_SIZES,
    )
    os.makedirs(out, exist_ok=True)
    _write_csv(os.path.join(out, "tuning.csv"), rows)
    best_row = next(r for r in rows if all(r[k] == v for k, v in best.items() if k in r))
    with open(os.path.join(out, "best.json"), "w") as f:
        json.dump({"split": split, "step": step, "params": best,
                   "f1": best_row["f1"], "object_dice": best_row["object_dice"]}, f, indent=2)
    flags = " ".join(f"--config.eval.{k}={v}" for k, v in best.items() if k != "fill_holes")
    print(f"best on {split} ({len(examples)} images): F1 {best_row['f1']:.4f}, object Dice "
          f"{best_row['object_dice']:.4f} with {flags}\n-> {out}")
    return {"best": best, "rows": rows}
