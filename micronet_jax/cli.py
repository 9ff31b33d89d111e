"""One command-line style for every entry point (``main``, ``ablation``, ``benchmark``).

* ``--config FILE[:ARG]`` and ``--config.section.key=value`` go through ``ml_collections.config_flags``;
  an unknown key is one line naming it, with absl's did-you-mean hint; a value written as a fraction
  (``--config.model.width=1/64``) is read as that float.
* The platform: ``config.platform``, when set, becomes ``JAX_PLATFORMS`` before JAX picks a backend
  (:func:`use_platform`); otherwise the environment decides. A CPU run started from the command line
  restarts itself once so that glibc's malloc asks for transparent huge pages
  (:func:`restart_with_hugepages`, ``config.cpu_hugepages``).
* Errors caused by the input or the config (:data:`USER_ERRORS`) end in one line and exit status 2;
  ``MICRONET_DEBUG=1`` shows the traceback instead (:func:`run_guarded`).
* Logging: the package logs at INFO, libraries (orbax, JAX, grain) at WARNING (:func:`setup_logging`).

``main`` parses everything with absl; the ablation runner and the benchmark keep their own flags in
argparse and hand ``--config`` and its overrides to :func:`parse_config`, which uses the same parser.
"""

from __future__ import annotations

import importlib.metadata
import logging as pylogging
import os
import platform as pyplatform
import re
import sys
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from micronet_jax.config import parse_value
from micronet_jax.workdir import WorkdirInUseError

# Errors that mean "the input or the config is wrong" (or training diverged, with the last good
# checkpoint kept, or the workdir is taken): shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, WorkdirInUseError)
CONFIG_HELP = ("Path to a config file in configs/ (e.g. configs/default.py), optionally followed by "
               "':ARG'. Override any field with --config.section.key=value; unknown keys are an error.")
_FRACTION = re.compile(r"^(--?config\.[^=]+)=(\d+(\.\d*)?/\d+(\.\d*)?)$")


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS, default: str | None = None,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
    return config_flags.DEFINE_config_file("config", default, CONFIG_HELP, flag_values=flag_values,
                                           lock_config=True, sys_argv=sys_argv)


def with_fractions(argv: Sequence[str]) -> list[str]:
    """``--config.k=1/64`` -> ``--config.k=0.015625``: reduced widths are naturally fractions."""
    out = []
    for arg in argv:
        m = _FRACTION.match(arg)
        out.append(f"{m.group(1)}={parse_value(m.group(2))!r}" if m else arg)
    return out


def parse_config(argv: Sequence[str], default: str | None = None) -> ml_collections.ConfigDict:
    """The config that ``--config FILE[:ARG]`` (else ``default``) and the ``--config.*`` overrides in
    ``argv`` describe; anything else in ``argv`` is an error. Bad input exits with one line."""
    args = ["prog", *with_fractions(argv)]
    values = flags.FlagValues()
    holder = define_config_flag(values, default, sys_argv=args)
    try:
        values(args)
        config = holder.value
        if config is None:
            exit_with("--config is required, e.g. --config configs/default.py")
        config.get("platform")  # ml_collections defers a failed config-file load to first access.
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        exit_with(describe_flag_error(e, args))
    return config


def overridden(argv: Sequence[str], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{"a.b": value}`` for each ``--config.a.b=...`` in ``argv``, as parsed into ``config``."""
    keys = [a.lstrip("-").split("=", 1)[0][len("config."):] for a in argv
            if re.match(r"^--?config\.", a)]
    out = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def describe_flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """One readable line for a flag error; for a config override it names the offending key."""
    chain = [error]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(chain[-1], OSError):
        return f"could not load --config: {str(chain[-1]).splitlines()[-1].strip()}"
    if isinstance(chain[-1], (AttributeError, KeyError)):
        bad_key = str(chain[-1].args[0] if chain[-1].args else chain[-1]).strip("'\"")
        hints = [str(e) for e in chain if "Did you mean" in str(e)]
        hint = hints[0][hints[0].index("Did you mean"):].strip("'\"") if hints else ""
        for arg in argv[1:]:
            key = arg.split("=", 1)[0].lstrip("-")
            if key.startswith("config.") and bad_key in key.split("."):
                return f"unknown config key {key[len('config.'):]!r}. {hint}".strip()
        return f"unknown config key {bad_key!r}. {hint}".strip()
    return str(error)


def exit_with(message: str) -> None:
    print(f"error: {message}\nRun with --help to see the flags.", file=sys.stderr)
    sys.exit(2)


def jax_platforms(platform: str, installed: Sequence[str] | None = None) -> str:
    """The ``JAX_PLATFORMS`` value for ``config.platform``.

    Why not "gpu" itself: jax 0.11 reads it as "cuda,rocm" and refuses to start when either plugin
    is missing ("Unable to initialize backend 'rocm'", seen on the H200 with jax 0.11.2), so "gpu"
    becomes the GPU backend whose plugin is installed, CUDA's if both are. With neither it stays
    "gpu" and JAX says what is missing. ``installed``: distribution names (default: this
    environment's).
    """
    if platform != "gpu":
        return platform
    if installed is None:
        installed = [d.metadata["Name"] or "" for d in importlib.metadata.distributions()]
    names = {n.lower().replace("_", "-") for n in installed}
    found = [kind for kind in ("cuda", "rocm")
             if any(n.startswith(f"jax-{kind}") and n.endswith(("-plugin", "-pjrt")) for n in names)]
    return found[0] if found else platform


HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode (always | madvise | never), or None if unreadable."""
    try:
        with open(path) as f:
            found = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return found.group(1) if found else None


def hugepage_environment(config: ml_collections.ConfigDict, environ: dict[str, str] | None = None,
                         thp_mode: str | None = None, libc: str | None = None) -> dict[str, str] | None:
    """The environment to restart a CPU run in so that malloc asks for transparent huge pages, or
    None when a restart would change nothing.

    Why: XLA's CPU runtime allocates the step's buffers afresh each step, and glibc serves the large
    ones with new mmaps, so every step faults in its working set 4 KiB at a time: 0.25 s of system
    time in a 0.97 s step of ``configs/default.py`` on the 2-core CI machine. With
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc marks its mappings MADV_HUGEPAGE, the faults come
    in 2 MiB pages, and the step took 0.88-0.90 s (issue #18, docs/benchmarks.md). glibc reads the
    variable only when a process starts, hence the restart. Nothing changes where the run is not on
    the CPU (``config.platform != "cpu"``), ``config.cpu_hugepages`` is off, the C library is not
    glibc, the kernel's mode is not ``madvise`` (``always`` already gives huge pages; ``never``
    refuses them), or ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` (the user's choice,
    or a process that has restarted already, so there is never a second restart).
    """
    environ = dict(os.environ if environ is None else environ)
    if config.get("platform") != "cpu" or not config.get("cpu_hugepages", False):
        return None
    if (libc if libc is not None else pyplatform.libc_ver()[0]) != "glibc":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _hugetlb_setting(tunables) is not None:
        return None
    if (thp_mode if thp_mode is not None else _thp_mode()) != "madvise":
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    return environ


def malloc_hugepages(environ: dict[str, str] | None = None) -> bool:
    """Whether this process's glibc malloc started with huge pages (``glibc.malloc.hugetlb`` 1 or 2),
    for the logs and the benchmark's metadata: a restart is otherwise invisible."""
    setting = _hugetlb_setting((os.environ if environ is None else environ).get("GLIBC_TUNABLES", ""))
    return setting not in (None, "0")


def _hugetlb_setting(tunables: str) -> str | None:
    """The value ``GLIBC_TUNABLES`` gives ``glibc.malloc.hugetlb`` (the last one wins), or None."""
    found = re.findall(r"glibc\.malloc\.hugetlb=([^:]*)", tunables)
    return found[-1] if found else None


def restart_with_hugepages(config: ml_collections.ConfigDict) -> None:
    """Replaces this process by the same command in :func:`hugepage_environment`, when there is one.

    Only for a process that a command line started (``sys.orig_argv``); it keeps its PID, so a
    scheduler's or a test's signals still reach it. Call it before anything is written or started.
    Never for a program read from standard input (``python - < script``, ``sys.argv[0]`` "-" or
    ""): that input is spent, and the restarted process would silently run nothing.
    """
    env = hugepage_environment(config)
    if env is None or not getattr(sys, "orig_argv", None) or sys.argv[0] in ("", "-"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # Not worth stopping for: run on, with 4 KiB pages.
        absl_logging.warning("could not restart with %s (%s); running without it", HUGEPAGE_TUNABLE, e)


def use_platform(config: ml_collections.ConfigDict, restart: bool = False) -> None:
    """``config.platform`` (cpu | gpu | tpu), when set, decides JAX's backend, and
    ``config.cpu_devices`` how many CPU devices JAX makes; both must precede JAX's first use of a
    device. None leaves ``JAX_PLATFORMS`` (or JAX's own choice) alone. An explicit
    ``XLA_FLAGS=--xla_force_host_platform_device_count`` (the tests' simulated devices) wins over
    ``cpu_devices``, and a process whose JAX already runs (a notebook, a test) keeps its devices.
    ``restart``: the caller is a command line's entry point, which may :func:`restart_with_hugepages`
    first (never a library call: it would replace the caller's process)."""
    if restart:
        restart_with_hugepages(config)
    if config.get("platform"):
        platforms = jax_platforms(config.platform)
        os.environ["JAX_PLATFORMS"] = platforms
        if "jax" in sys.modules:  # JAX reads the variable when it is imported; tell it directly too.
            sys.modules["jax"].config.update("jax_platforms", platforms)
    n = config.get("cpu_devices")
    if n is None or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if int(n) < 1:
        exit_with(f"config cpu_devices={n} must be >= 1 (or None for JAX's default)")
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:  # JAX's backends are already up in this process: keep what it has.
        absl_logging.info("config cpu_devices=%d not applied: JAX is already initialised", int(n))


def debug() -> bool:
    """``MICRONET_DEBUG=1``: show tracebacks instead of one-line errors."""
    return bool(os.environ.get("MICRONET_DEBUG"))


def run_guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls ``fn``; a user error becomes one line and exit status 2 (unless :func:`debug`)."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if debug():
            raise
        exit_with(f"{e}\n(set MICRONET_DEBUG=1 to see the traceback)")


def setup_logging() -> None:
    """Libraries (orbax, JAX's backend probing, grain) log through absl at INFO in great detail:
    show their warnings only, and this package's own progress at INFO."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logging.use_absl_handler()
    pylogging.getLogger("micronet_jax").setLevel(pylogging.INFO)
