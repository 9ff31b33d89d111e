"""micronet_jax: Micro-Net (Raza et al., Medical Image Analysis 2019) in JAX/Flax.

Modules, in the direction data flows: ``config`` -> ``data`` -> ``models`` -> ``losses`` -> ``train``
-> ``infer`` / ``postprocess`` -> ``metrics`` -> ``evaluate``; ``main`` is the command line.
"""

__version__ = "0.1.0"
