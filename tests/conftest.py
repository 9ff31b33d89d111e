"""Shared test setup: keep JAX on the CPU and quiet, and share compiled programs between tests."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Several tests (and the subprocesses of the resume and multi-host tests) compile the same train
# step; a persistent cache for the session turns the repeats into cache hits. Inherited by children.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "micronet_jax_test_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
