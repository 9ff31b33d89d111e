"""One entry point from the ``data`` config section to a list of examples for a named split.

The trainer and evaluator ask for ``"train"``, ``"val"``, ``"testA"`` ... and should not care whether the
examples come from the official GlaS folder, a generic images/masks folder or the built-in synthetic
generator. Keeping the split logic here (rather than in each caller) guarantees that training and
evaluation see the same validation images for the same config.

Splits:

- ``train`` / ``val``: the seeded split (``data.val_fraction``, ``data.split_by``, ``data.val_split_seed``)
  of the training images. For ``synthetic`` they are independently generated sets instead.
- ``train_all``: every training image (train + val), for a final fit without validation.
- ``testA`` / ``testB``: the official GlaS test sets (``glas`` only; synthetic generates stand-ins).

Synthetic seeds: split ``k`` (train=1, val=2, testA=3, testB=4) uses dataset seed
``1000 * data.val_split_seed + k``, so the synthetic dataset is fixed by the same key that fixes a
real validation split (not by the training seed ``c.seed``) and no two splits share an image.
``testA``/``testB`` have ``data.synthetic_num_val`` images each (there is no separate config key).
"""

from __future__ import annotations

from typing import Any

from micronet_jax.config import config_value
from micronet_jax.data.readers import DataError, Example, load_folder, load_glas, split_train_val
from micronet_jax.data.synthetic import make_synthetic_glands

__all__ = ["SPLITS", "SYNTHETIC_SPLIT_OFFSETS", "load_split"]

SPLITS: tuple[str, ...] = ("train", "val", "train_all", "testA", "testB")
SYNTHETIC_SPLIT_OFFSETS: dict[str, int] = {"train": 1, "val": 2, "testA": 3, "testB": 4}


def _synthetic(data_config: Any, split: str) -> list[Example]:
    """Generates the synthetic split; ``train_all`` is train followed by val."""
    if split == "train_all":
        return _synthetic(data_config, "train") + _synthetic(data_config, "val")
    num = int(data_config.synthetic_num_train if split == "train" else data_config.synthetic_num_val)
    seed = 1000 * int(data_config.val_split_seed) + SYNTHETIC_SPLIT_OFFSETS[split]
    return make_synthetic_glands(
        num,
        height=int(data_config.synthetic_height),
        width=int(data_config.synthetic_width),
        seed=seed,
        name_prefix=f"synthetic_{split}",
        touch_prob=float(config_value(data_config, "synthetic_touch_prob", "data")),
    )


def _train_val(examples: list[Example], data_config: Any, split: str) -> list[Example]:
    """Applies the configured seeded split and returns the requested side."""
    if split == "train_all":
        return examples
    train, val = split_train_val(
        examples,
        float(data_config.val_fraction),
        by=str(data_config.split_by),
        seed=int(data_config.val_split_seed),
    )
    return train if split == "train" else val


def load_split(data_config: Any, split: str) -> list[Example]:
    """Returns the examples of ``split`` for the ``data`` config section (see the module docstring).

    Args:
      data_config: The ``config.data`` ConfigDict (reads ``source``, ``root``, ``val_fraction``,
        ``split_by``, ``val_split_seed`` and the ``synthetic_*`` keys).
      split: One of :data:`SPLITS`.

    Raises:
      DataError: unknown source or split, ``data.root`` unset for a file source, a split the source
        does not have, or an empty result (e.g. ``val`` with ``val_fraction=0``).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    source = str(data_config.source)
    root = config_value(data_config, "root", "data")
    if source == "synthetic":
        examples = _synthetic(data_config, split)
        where = "synthetic data"
    elif source in ("glas", "folder"):
        if not root:
            raise DataError(
                f"config data.root is not set: data.source={source!r} needs the dataset folder, "
                "e.g. --config.data.root=/path/to/glas (or use --config.data.source=synthetic)"
            )
        where = str(root)
        if source == "glas":
            if split in ("testA", "testB"):
                examples = load_glas(root, split)
            else:
                examples = _train_val(load_glas(root, "train"), data_config, split)
        else:
            if split in ("testA", "testB"):
                raise DataError(
                    f"split {split!r} exists only for data.source='glas'; a folder dataset ({root}) "
                    "has train/val/train_all (point data.root at a separate folder to evaluate on it)"
                )
            examples = _train_val(load_folder(root), data_config, split)
    else:
        raise DataError(f"unknown data.source {source!r}; expected glas, folder or synthetic")
    if not examples:
        hint = " (data.val_fraction is 0)" if split == "val" and float(data_config.val_fraction) == 0 else ""
        raise DataError(f"split {split!r} of {where} is empty{hint}")
    return examples
