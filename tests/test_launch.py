"""The launch scripts (launch/*.sh, *.sbatch): what they print is what they run, and --dry-run runs nothing.

Every external program they may start (python, srun, sbatch, gcloud, git) is replaced by a fake on
PATH that records its arguments and environment. A dry run must leave no record; a real run must
hand the fake exactly the command the script printed. No JAX, no compiles: each script runs in
milliseconds.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
FAKES = ("python", "python3", "srun", "sbatch", "gcloud", "git", "nvidia-smi")


@pytest.fixture()
def fake_bin(tmp_path: Path) -> Path:
    """A folder of fake executables; each appends its argv (NUL-separated) to calls/<name>."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name in FAKES:
        script = bin_dir / name
        script.write_text(
            "#!/bin/bash\n"
            f'printf "%s\\0" "$@" >> "{calls}/{name}"\n'
            f'env > "{calls}/{name}.env"\n'
        )
        script.chmod(0o755)
    return tmp_path


def launch(script: str, *args: str, fakes: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a launch script with only the fakes and the basic system tools on PATH."""
    full_env = {
        "PATH": f"{fakes / 'bin'}:/usr/bin:/bin",
        "HOME": str(fakes),
        **(env or {}),
    }
    cmd = ["bash", str(LAUNCH / script), *args]
    proc = subprocess.run(cmd, cwd=cwd or fakes, env=full_env, capture_output=True, text=True,
                          timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def started(fakes: Path) -> dict[str, list[list[str]]]:
    """What the fakes recorded: program -> list of argv (one per call, best effort split)."""
    out = {}
    for f in (fakes / "calls").iterdir():
        if f.suffix != ".env":
            out[f.name] = f.read_text().split("\0")[:-1]
    return out


def printed_commands(stdout: str) -> list[list[str]]:
    """The commands a script announced ("+ ..." lines), split the way a shell would split them."""
    return [shlex.split(line.strip()[2:]) for line in stdout.splitlines() if line.strip().startswith("+ ")]


# ------------------------------------------------------------------------------------------ dry runs


def test_gpu_single_dry_run_prints_the_command_and_starts_nothing(fake_bin):
    proc = launch("gpu_single.sh", "--workdir=runs/glas", "--config.data.root=/data/GlaS",
                  "--dry-run", fakes=fake_bin, env={"GPU": "3"})
    assert started(fake_bin) == {}
    [cmd] = printed_commands(proc.stdout)
    assert cmd[:2] == ["env", "CUDA_VISIBLE_DEVICES=3"]
    python = cmd[cmd.index("python"):]
    assert python[:3] == ["python", "-m", "micronet_jax.main"]
    assert "--mode=train" in python and "--config.platform=gpu" in python
    assert f"--config={REPO}/configs/glas_508.py" in python
    # A relative workdir is taken from the caller's folder, not the repository the command runs in.
    assert f"--workdir={fake_bin}/runs/glas" in python
    assert python[-1] == "--config.data.root=/data/GlaS"  # User overrides last: they win.
    assert "1 GPU" in proc.stdout and "dry run: nothing was started" in proc.stdout


def test_gpu_host_dry_run_reports_the_per_device_batch(fake_bin):
    proc = launch("gpu_host.sh", "--workdir=/runs/x", "--config=configs/synthetic_508.py",
                  "--config.train.batch_size=16", "--dry-run", fakes=fake_bin,
                  env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert started(fake_bin) == {}
    [cmd] = printed_commands(proc.stdout)
    assert "CUDA_VISIBLE_DEVICES=0" not in " ".join(cmd)  # All visible GPUs, one process.
    assert f"--config={REPO}/configs/synthetic_508.py" in cmd
    assert "--config.train.batch_size=16" in cmd and "--config.distributed.initialize=True" not in cmd
    assert "all 4 GPUs" in proc.stdout and "per GPU = batch / 4" in proc.stdout


def test_slurm_submit_dry_run_prints_sbatch_and_the_srun_line(fake_bin):
    proc = launch("slurm_submit.sh", "--nodes=4", "--partition=gpu", "--workdir=/shared/runs/glas",
                  "--config.train.batch_size=32", "--dry-run", fakes=fake_bin)
    assert started(fake_bin) == {}
    sbatch, srun = printed_commands(proc.stdout)
    assert sbatch[0] == "sbatch" and sbatch[sbatch.index("--nodes=4")] == "--nodes=4"
    assert {"--ntasks-per-node=1", "--gpus-per-node=8", f"--chdir={REPO}", "--partition=gpu"} <= set(sbatch)
    assert str(LAUNCH / "slurm_multinode.sbatch") in sbatch
    assert sbatch[-2:] == ["--workdir=/shared/runs/glas", "--config.train.batch_size=32"]
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    # One process per node drives all 8 of its GPUs (JAX alone would take only GPU SLURM_LOCALID).
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in srun
    assert {"--config.distributed.initialize=True", "--config.platform=gpu"} <= set(srun)
    assert "32 GPUs, 4 processes" in proc.stdout and "per GPU = batch / 32" in proc.stdout


def test_slurm_submit_per_gpu_dry_run(fake_bin):
    proc = launch("slurm_submit.sh", "--nodes=2", "--per-gpu", "--gpus-per-node=4",
                  "--workdir=/shared/w", "--dry-run", fakes=fake_bin)
    assert started(fake_bin) == {}
    sbatch, srun = printed_commands(proc.stdout)
    assert "--ntasks-per-node=4" in sbatch and "--gpus-per-node=4" in sbatch
    assert not any(a.startswith("JAX_LOCAL_DEVICE_IDS") for a in srun)  # JAX picks SLURM_LOCALID.
    assert "8 GPUs, 8 processes" in proc.stdout


def test_tpu_pod_dry_run_prints_every_gcloud_step_and_starts_nothing(fake_bin):
    env = {"TPU_NAME": "mn", "ZONE": "us-west4-a", "PROJECT": "p1", "DATA_DIR": "/data/GlaS",
           "USER": "ana"}
    proc = launch("tpu_pod.sh", "all", "--workdir=/mnt/shared/runs/glas",
                  "--config.train.batch_size=16", "--dry-run", fakes=fake_bin, env=env)
    assert "gcloud" not in started(fake_bin) and "archive" not in started(fake_bin).get("git", [])
    create, archive, scp, install, data, train = printed_commands(proc.stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--zone=us-west4-a", "--project=p1", "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite"} <= set(create)
    assert archive[:4] == ["git", "-C", str(REPO), "archive"]
    assert scp[4] == "scp" and "--worker=all" in scp and "--worker=all" in install
    assert 'pip install -q ".[tpu]"' in install[install.index("--command") + 1]
    assert data[4:8] == ["scp", "--recurse", "/data/GlaS", "mn:/home/ana/glas"]
    assert train[4:6] == ["ssh", "mn"] and "--worker=all" in train
    remote = shlex.split(train[train.index("--command") + 1])
    assert remote[:3] == ["cd", "~/micronet-jax", "&&"]
    python = remote[remote.index("python3"):]
    assert python[:3] == ["python3", "-m", "micronet_jax.main"]
    assert {"--config=configs/glas_508.py", "--workdir=/mnt/shared/runs/glas",
            "--config.distributed.initialize=True", "--config.platform=tpu",
            "--config.data.root=/home/ana/glas"} <= set(python)
    assert python[-1] == "--config.train.batch_size=16"


def test_help_and_missing_settings_start_nothing(fake_bin):
    for script in ("gpu_single.sh", "gpu_host.sh", "slurm_submit.sh", "slurm_multinode.sbatch"):
        proc = launch(script, "--help", fakes=fake_bin)
        assert "--dry-run" in proc.stdout, script
        assert "SBATCH" not in proc.stdout
    assert "{create|setup|train|all|delete}" in launch("tpu_pod.sh", "--help", fakes=fake_bin).stdout
    proc = launch("gpu_single.sh", "--dry-run", fakes=fake_bin, check=False)
    assert proc.returncode == 2 and "--workdir" in proc.stderr
    proc = launch("tpu_pod.sh", "train", "--workdir=/w", fakes=fake_bin, env={"ZONE": "z"}, check=False)
    assert proc.returncode != 0 and "TPU_NAME" in proc.stderr
    assert started(fake_bin) == {}


# ---------------------------------------------------------------------------- real runs (fakes)


def test_gpu_single_runs_exactly_the_printed_command(fake_bin):
    proc = launch("gpu_single.sh", "--workdir=/runs/x", "--config.data.root=/a b/it's",
                  fakes=fake_bin)
    [cmd] = printed_commands(proc.stdout)
    calls = started(fake_bin)
    python = cmd[cmd.index("python"):]
    assert calls["python"] == python[1:]  # Same arguments, quoting included.
    env = (fake_bin / "calls" / "python.env").read_text().splitlines()
    assert "CUDA_VISIBLE_DEVICES=0" in env
    assert f"JAX_COMPILATION_CACHE_DIR={fake_bin}/.cache/micronet_jax/xla" in env


def test_sbatch_script_inside_an_allocation_runs_srun_with_the_slurm_layout(fake_bin):
    """The job side: SLURM's variables in, the coordinator JAX will derive printed, srun started."""
    slurm = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu001,gpu002", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO)}
    proc = launch("slurm_multinode.sbatch", "--workdir=/shared/w", fakes=fake_bin, env=slurm)
    # jax's SLURM detection: first node of the list, port 61440 + job id % 4096.
    assert "coordinator: gpu001:62674" in proc.stdout
    [cmd] = printed_commands(proc.stdout)
    assert started(fake_bin)["srun"] == cmd[1:]
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in cmd
    bad = dict(slurm, SLURM_NTASKS_PER_NODE="3")
    proc = launch("slurm_multinode.sbatch", "--workdir=/shared/w", fakes=fake_bin, env=bad, check=False)
    assert proc.returncode == 2 and "must be 1 (per node) or 8 (per GPU)" in proc.stderr


def test_tpu_train_passes_awkward_overrides_through_ssh_intact(fake_bin):
    env = {"TPU_NAME": "mn", "ZONE": "z"}
    launch("tpu_pod.sh", "train", "--workdir=/mnt/w", "--config.data.root=/a b/it's",
           fakes=fake_bin, env=env)
    gcloud = started(fake_bin)["gcloud"]
    assert gcloud[:6] == ["compute", "tpus", "tpu-vm", "ssh", "mn", "--worker=all"]
    remote = shlex.split(gcloud[gcloud.index("--command") + 1])  # What the workers' shell sees.
    assert remote[-1] == "--config.data.root=/a b/it's"


def test_platform_gpu_names_the_installed_gpu_backend():
    # jax 0.11 reads JAX_PLATFORMS=gpu as "cuda,rocm" and fails without the ROCm plugin (the H200).
    from micronet_jax.cli import jax_platforms

    assert jax_platforms("gpu", ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt"]) == "cuda"
    assert jax_platforms("gpu", ["jax_cuda12_plugin"]) == "cuda"
    assert jax_platforms("gpu", ["jax-rocm7-plugin", "jax-rocm7-pjrt"]) == "rocm"
    assert jax_platforms("gpu", ["jax-rocm7-plugin", "jax-cuda13-plugin"]) == "cuda"
    assert jax_platforms("gpu", ["jax", "jaxlib"]) == "gpu"  # JAX then says what is missing.
    assert jax_platforms("cpu", ["jax-cuda13-plugin"]) == "cpu"
    assert jax_platforms("tpu") == "tpu"


def _cpu_config(**keys):
    import ml_collections

    return ml_collections.ConfigDict({"platform": "cpu", "cpu_hugepages": True, **keys})


# A command-line program that asks for the huge-page restart, then prints GLIBC_TUNABLES after `label`.
_RESTARTING_PROGRAM = (
    "import os, ml_collections; from micronet_jax import cli; {before}"
    "cli.use_platform(ml_collections.ConfigDict({{'platform': 'cpu', 'cpu_hugepages': True, "
    "'cpu_devices': None}}), restart=True); print('{label}', os.environ.get('GLIBC_TUNABLES'))")


def test_cpu_runs_ask_for_huge_pages_once_and_only_where_it_changes_something():
    # Issue #18: glibc faulted the step's buffers in 4 KiB pages; its hugetlb tunable is read at start-up.
    from micronet_jax.cli import HUGEPAGE_TUNABLE, hugepage_environment

    env = hugepage_environment(_cpu_config(), {"PATH": "/bin"}, thp_mode="madvise", libc="glibc")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGEPAGE_TUNABLE}
    kept = hugepage_environment(_cpu_config(), {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                thp_mode="madvise", libc="glibc")
    assert kept["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGEPAGE_TUNABLE}"
    # Nothing to gain, or the user's (or an earlier restart's) own setting: no restart.
    for config, environ, mode, libc in [
        (_cpu_config(platform="gpu"), {}, "madvise", "glibc"),
        (_cpu_config(platform=None), {}, "madvise", "glibc"),
        (_cpu_config(cpu_hugepages=False), {}, "madvise", "glibc"),
        (_cpu_config(), {}, "always", "glibc"),
        (_cpu_config(), {}, "never", "glibc"),
        (_cpu_config(), {}, "madvise", ""),  # musl, macOS
        (_cpu_config(), {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc"),
        (_cpu_config(), {"GLIBC_TUNABLES": HUGEPAGE_TUNABLE}, "madvise", "glibc"),
    ]:
        assert hugepage_environment(config, environ, thp_mode=mode, libc=libc) is None, (config, environ, mode)


def test_the_restart_reruns_the_same_command_in_the_same_process():
    # What `python -c` sees twice: before the restart and after it. Same PID, the tunable set once.
    import platform
    import sys

    from micronet_jax import cli

    code = _RESTARTING_PROGRAM.format(before="print(os.getpid(), flush=True); ", label="tunables")
    env = {k: v for k, v in __import__("os").environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=REPO, check=True).stdout.split("\n")
    restarts = cli._thp_mode() == "madvise" and platform.libc_ver()[0] == "glibc"
    if restarts:
        assert out[0] == out[1], out  # Printed by the first process and again after the exec: one PID.
        assert out[2] == f"tunables {cli.HUGEPAGE_TUNABLE}", out
    else:
        assert out[1] == "tunables None", out


def test_logs_say_whether_malloc_got_huge_pages():
    from micronet_jax.cli import malloc_hugepages

    assert malloc_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert malloc_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"})
    assert not malloc_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not malloc_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not malloc_hugepages({})


def test_a_program_read_from_stdin_is_never_restarted():
    # Its input is spent: a restarted `python - < script` would run nothing and exit 0.
    import sys

    code = _RESTARTING_PROGRAM.format(before="", label="ran") + "\n"
    env = {k: v for k, v in __import__("os").environ.items() if k != "GLIBC_TUNABLES"}
    for argv in ([sys.executable, "-"], [sys.executable]):
        out = subprocess.run(argv, input=code, env=env, capture_output=True, text=True, timeout=120,
                             cwd=REPO, check=True).stdout
        assert out == "ran None\n", (argv, out)
