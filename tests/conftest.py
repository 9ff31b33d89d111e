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

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str = "default", arg: str | None = None):
    """Calls configs/<name>.py:get_config(arg) the way config_flags would, without parsing flags."""
    from micronet_jax.config import load_config_file

    return load_config_file(str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))


def run_main(*args: str, env: dict | None = None, timeout: float = 600, check: bool = True):
    """Runs ``python -m micronet_jax.main ARGS`` from the repo root, as a user would."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "micronet_jax.main", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


TINY = ["--config", "configs/default.py:tiny"]


def initialised_checkpoint(workdir, seed: int = 0):
    """The tiny model's initial weights (from ``seed``) saved as a weights-only step-0 checkpoint in
    ``workdir``: a checkpoint the CLI restores without compiling a training step."""
    import jax
    import numpy as np

    from micronet_jax import checkpointing
    from micronet_jax.models import build_model

    config = load_config("default", "tiny")
    model = build_model(config.model)
    variables = jax.jit(lambda k: model.init(k, np.zeros((1, 508, 508, 3), np.float32), train=False))(
        jax.random.PRNGKey(seed))
    manager = checkpointing.make_manager(str(workdir))
    checkpointing.save_weights(manager, 0, variables, config=config)
    manager.wait_until_finished()
    manager.close()
    return workdir


def restored_params(workdir, config):
    """The parameters ``--mode=evaluate`` would use from a workdir or step folder, and their step."""
    import jax

    from micronet_jax import checkpointing
    from micronet_jax.models import build_model
    from micronet_jax.models.summary import abstract_variables

    variables, step = checkpointing.restore_variables(
        str(workdir), config.model, abstract_variables(build_model(config.model))
    )
    return jax.device_get(variables["params"]), step


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """Six tiny steps straight through the real command line: the reference that every resumed,
    stopped or repaired run must equal bitwise. Keeps the checkpoints of steps 2, 4 and 6."""
    workdir = tmp_path_factory.mktemp("straight")
    run_main(*TINY, f"--workdir={workdir}", "--config.train.max_steps=6",
             "--config.train.keep_checkpoints=3")
    return workdir
