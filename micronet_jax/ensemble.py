"""Several trained Micro-Nets of one architecture used as one model: the mean of their probabilities.

Seeds of one recipe, or the folds of a cross-validation, disagree most on the glands that are hard to
see, and the mean of their softmax outputs is the usual way to use them together (nnU-Net averages
its five folds the same way). ``--checkpoint`` given several times builds an :class:`Ensemble`; it
quacks like a :class:`~micronet_jax.models.MicroNet` where inference needs one (``apply`` returning
``{"main": logits}``, ``variant``), so tiling, test-time augmentation, stitching, post-processing and
whole-slide prediction run unchanged.

The members' weights are stacked on a leading axis and run one after the other inside the one jitted
program (``lax.map``), so an ensemble of N costs N forward passes but the activation memory of one:
full-width Micro-Net-508 members fit wherever one does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """``size`` members of ``member``'s architecture; ``apply`` takes their stacked variables."""

    member: Any  # a MicroNet; every member has its architecture.
    size: int

    @property
    def variant(self) -> int:
        return self.member.variant

    def apply(self, variables: Any, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """``{"main": log of the members' mean probability}``: a softmax of it gives that mean back
        exactly, so every consumer of logits reads the ensemble's probabilities."""
        if train:
            raise ValueError("an ensemble is for inference; train its members one by one")
        log_probs = jax.lax.map(
            lambda v: jax.nn.log_softmax(self.member.apply(v, x, train=False)["main"], axis=-1),
            variables)
        return {"main": jax.nn.logsumexp(log_probs, axis=0) - jnp.log(float(self.size))}


def stack(members: Sequence[Any]) -> Any:
    """The members' variables stacked leaf by leaf on a new leading axis (one tree, as ``apply``
    takes it). Members of one model config have the same tree; anything else is refused."""
    structures = {jax.tree.structure(m) for m in members}
    if len(structures) != 1:
        raise ValueError("the ensemble's checkpoints hold differently shaped models; pass checkpoints "
                         "trained with one model config")
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *members)
