"""GlaS as a TensorFlow Datasets (TFDS) builder that works without TensorFlow.

Why: TFDS gives a versioned, checksummed, random-access copy of the dataset (ArrayRecord files) that
grain can read directly, which is convenient on machines where the raw folder is awkward to stage.
The builder only *reads* the official folder with :func:`~micronet_jax.data.readers.load_glas`, so the
TFDS copy holds exactly the pixels and labels the rest of the package would load from disk.

Constraints from running without TensorFlow (see ``docs/jax_notes.md``, "TFDS without TensorFlow"):

- files are written with ``file_format="array_record"`` and read with ``tfds.data_source`` (random
  access); ``as_dataset`` would need TensorFlow;
- images are passed to the ``Image`` feature as PIL images, never numpy arrays;
- labels are a ``Tensor(int32, (None, None), encoding=zlib)``, not a 16-bit ``Image``: decoding a
  uint16 PNG without TensorFlow needs OpenCV (PIL is refused for uint16 by TFDS 4.9), and an 8-bit
  image would cap an image at 255 glands. zlib keeps the mostly-zero label maps small.

Importing this module needs ``tensorflow_datasets`` (the ``tfds`` extra); importing
``micronet_jax.data`` does not, because nothing there imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only where tfds is absent.
    raise ImportError(
        "micronet_jax.data.tfds_glas needs tensorflow-datasets and array_record: "
        "pip install 'micronet-jax[tfds]'"
    ) from e

from micronet_jax.data.readers import GLAS_SPLITS, DataError, Example, load_glas

__all__ = ["Glas", "build_glas_tfds", "glas_data_source", "example_from_record"]

PathLike = str | os.PathLike


class Glas(tfds.core.GeneratorBasedBuilder):
    """GlaS (MICCAI 2015 Gland Segmentation Challenge) from a manually downloaded folder.

    Splits ``train`` / ``testA`` / ``testB``, whichever the folder holds. Records keep the official
    order (``train_1, train_2, ...``), so record ``i`` of ``train`` is ``train_{i+1}``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: image, instance label, name, grade, patient."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    GlaS cannot be downloaded automatically (registration and research-only terms). Download the
    Warwick-QU GlaS release and put its files, unchanged, in one flat folder: train_N.bmp,
    train_N_anno.bmp, testA_N(.bmp|_anno.bmp), testB_N(...) and Grade.csv. PNG/TIFF copies with the
    same names also work. Pass that folder as the manual_dir, e.g.
    micronet_jax.data.tfds_glas.build_glas_tfds(manual_dir="/path/to/glas", data_dir="/path/to/tfds").
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> Any:
        """This file, so TFDS never probes the package with ``importlib_resources``.

        TFDS's default resolves the builder's package via ``etils.epath.resource_path`` and then
        checks ``isinstance(path, importlib_resources.abc.Traversable)``, which imports the
        ``importlib_resources`` backport: not a declared dependency, absent from our environments,
        and only used here to look for a (non-existent) ``checksums.tsv`` next to the code.
        """
        from etils import epath

        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Gland segmentation in colon histology (H&E, 20x). Instance labels: 0 background, "
                "1..K one id per gland."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png"),
                    "label": tfds.features.Tensor(
                        shape=(None, None), dtype=np.int32, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "name": tfds.features.Text(),
                    "grade": tfds.features.Text(),  # "" when unknown.
                    "patient": tfds.features.Text(),  # "" when unknown.
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/",
            citation=(
                "Sirinukunwattana et al., Gland segmentation in colon histology images: The GlaS "
                "challenge contest, Medical Image Analysis 35 (2017)."
            ),
            disable_shuffling=True,  # Keep the official order; grain shuffles at read time anyway.
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        root = Path(dl_manager.manual_dir)
        if not root.is_dir():
            raise DataError(f"GlaS manual_dir not found: {root}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        present = [s for s in GLAS_SPLITS if any(root.glob(f"{s}_*"))]
        if not present:
            raise DataError(f"no train_*/testA_*/testB_* images in {root}")
        return {split: self._generate_examples(root, split) for split in present}

    def _generate_examples(self, root: Path, split: str):  # -> Iterator[tuple[str, dict]]
        # load_glas validates every pair (size match, masks present) before anything is written.
        for ex in load_glas(root, split):
            yield ex.name, {
                "image": Image.fromarray(ex.image, mode="RGB"),
                "label": ex.label.astype(np.int32),
                "name": ex.name,
                "grade": ex.grade or "",
                "patient": ex.patient or "",
            }


def build_glas_tfds(manual_dir: PathLike, data_dir: PathLike) -> None:
    """Builds (or reuses, if already built) the GlaS TFDS copy under ``data_dir`` as ArrayRecord."""
    builder = Glas(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )


def glas_data_source(data_dir: PathLike, split: str) -> Any:
    """Returns the random-access ``tfds.data_source`` of a built split (feeds ``grain.MapDataset.source``).

    Each record is a dict: ``image`` uint8 (H, W, 3), ``label`` int32 (H, W), ``name``/``grade``/
    ``patient`` as bytes; :func:`example_from_record` turns one into an :class:`Example`.
    """
    data_dir = os.fspath(data_dir)
    # Check first: tfds.data_source would otherwise try to *build* a missing dataset (and fail on
    # the manual_dir) or raise a bare error for a missing split.
    builder = Glas(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        raise DataError(f"no built GlaS TFDS dataset in {data_dir}: run build_glas_tfds(manual_dir, data_dir) first")
    base = split.split("[", 1)[0]
    if base not in builder.info.splits:
        raise DataError(
            f"split {base!r} is not in the GlaS TFDS dataset in {data_dir} "
            f"(it has {', '.join(sorted(builder.info.splits))})"
        )
    return tfds.data_source("glas", data_dir=data_dir, split=split, download=False)


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def example_from_record(record: dict[str, Any]) -> Example:
    """Converts a decoded TFDS record to an :class:`Example` (empty grade/patient become None)."""
    grade, patient = _text(record["grade"]), _text(record["patient"])
    return Example(
        name=_text(record["name"]),
        image=np.asarray(record["image"], np.uint8),
        label=np.asarray(record["label"], np.int32),
        grade=grade or None,
        patient=patient or None,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m micronet_jax.data.tfds_glas --manual_dir GLAS --data_dir OUT``: the TF-free ``tfds build``.

    tensorflow-datasets 4.9's own ``tfds build`` command imports TensorFlow at start-up, so this is
    the way to build the GlaS copy on machines without it.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m micronet_jax.data.tfds_glas",
        description="Build the GlaS TFDS dataset (ArrayRecord) from the official folder, no TensorFlow needed.",
    )
    parser.add_argument("--manual_dir", required=True,
                        help="the official GlaS folder (train_N.bmp, train_N_anno.bmp, testA_*, testB_*, Grade.csv)")
    parser.add_argument("--data_dir", required=True, help="where TFDS writes the built dataset")
    args = parser.parse_args(argv)
    build_glas_tfds(args.manual_dir, args.data_dir)
    for split in ("train", "testA", "testB"):
        try:
            print(f"{split}: {len(glas_data_source(args.data_dir, split))} records")
        except DataError:  # A split absent from the folder is simply not built.
            continue
    print(f"built GlaS in {args.data_dir}")


if __name__ == "__main__":
    main()
