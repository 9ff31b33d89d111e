"""The benchmark CLI end to end on the CPU at width 1/64: both tables, every column, the JSON file.

One train-step compile (shared through the persistent cache with test_grad_accum.py, which uses the
same config) and one tile-forward compile; two timed steps and one synthetic 775x522 image, so the
numbers are meaningless here and only the plumbing is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from micronet_jax import benchmark
from micronet_jax.config import parse_value

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")


def test_parse_value_and_overrides(capsys):
    assert parse_value("1/64") == pytest.approx(1 / 64)
    assert parse_value("0.5") == 0.5
    assert parse_value("false") is False
    assert parse_value("bfloat16") == "bfloat16"
    _, c = benchmark.parse_args(["--config", CONFIG, "--config.model.width=1/32"])
    assert c.model.width == pytest.approx(1 / 32)
    _, c = benchmark.parse_args(["--config", CONFIG, "--set", "model.width=1/32"])  # deprecated alias
    assert c.model.width == pytest.approx(1 / 32)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--config", CONFIG, "--config.model.widht=1"])
    assert "unknown config key 'model.widht'" in capsys.readouterr().err  # As micronet_jax.main says.


def test_help_mentions_the_main_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--batch", "--dtype", "--remat", "--steps", "--peak-tflops", "--tta", "--json"):
        assert flag in text


@pytest.mark.slow
def test_benchmark_runs_on_cpu_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = benchmark.main([
        "--config", CONFIG, "--config.model.width=1/64", "--config.model.dropout=0.0",
        "--batch", "4", "--dtype", "float32", "--remat", "false",
        "--steps", "2", "--warmup", "1", "--images", "1", "--json", str(out),
    ])
    text = capsys.readouterr().out
    for column in ("patches/s", "TFLOP/s", "MFU", "peak mem", "compile s", "tiles/s", "images/s"):
        assert column in text, column

    saved = json.loads(out.read_text())
    assert saved["meta"]["width"] == pytest.approx(1 / 64)
    # Analytic count: forward FLOPs shrink with width, and a training step counts 3x.
    assert 0 < saved["meta"]["forward_tflop_per_patch"] < 1.337 / 100
    assert saved["meta"]["train_tflop_per_patch"] == pytest.approx(
        3 * saved["meta"]["forward_tflop_per_patch"])
    (train,) = saved["train"]
    assert (train["batch"], train["dtype"], train["remat"]) == (4, "float32", False)
    assert len(train["step_s_all"]) == 2 and train["loss_finite"]
    assert train["patches_per_s"] == pytest.approx(4 / train["step_s_median"])
    assert train["tflops"] == pytest.approx(
        saved["meta"]["train_tflop_per_patch"] * train["patches_per_s"])
    assert train["mfu"] == pytest.approx(train["tflops"] / benchmark.DEFAULT_PEAK_TFLOPS)
    assert train["compile_s"] > 0 and train["peak_bytes"] > 0  # CPU: XLA's memory analysis.
    (inference,) = saved["inference"]
    assert inference["tiles_per_image"] == 6  # 650x903 padded -> 2 x 3 tiles of 508.
    assert inference["tiles_per_s"] > 0 and inference["images_per_s"] > 0
    assert result["train"][0]["patches_per_s"] == train["patches_per_s"]
