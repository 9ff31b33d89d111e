"""Datasets: readers for GlaS and generic folders, the synthetic generator, and split selection.

``micronet_jax.data.tfds_glas`` (the optional TFDS builder) is deliberately not imported here, so this
package works without tensorflow-datasets.
"""

# ruff: noqa: F401  (re-exports)

from micronet_jax.data.readers import DataError, Example, load_folder, load_glas, split_train_val
from micronet_jax.data.sources import load_split
from micronet_jax.data.synthetic import make_synthetic_glands

