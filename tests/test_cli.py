"""`autobatch` through typer's runner and as a subprocess."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mps_autobatch.cli import app

runner = CliRunner()
TINY = ["--model", "test_efficientnet", "--image-size", "32", "--num-classes", "10"]


def test_probe_json_on_the_simulated_mac():
    result = runner.invoke(app, ["probe", *TINY, "--simulate", "mps:16GiB", "--memory-limit", "256MiB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"] == "test_efficientnet" and data["device"] == "sim-mps"
    assert data["limit_bytes"] == 256 * 2**20 and data["budget_bytes"] == int(256 * 2**20 * 0.8)
    chosen = [t for t in data["trials"] if t["batch_size"] == data["batch_size"] and t["outcome"] == "ok"]
    assert chosen and chosen[-1]["peak_bytes"] <= data["budget_bytes"]
    assert data["strategy"] == "measure"


def test_probe_prints_the_size_on_stdout_and_the_table_on_stderr():
    result = runner.invoke(app, ["probe", *TINY, "--device", "cpu", "--memory-limit", "2GiB", "--max-batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "16"
    assert "Recommended batch size: 16" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "efficientnet_bo"], "Error: Unknown timm model 'efficientnet_bo'. Did you mean 'efficientnet_b0'?"),
        (["--image-size", "4"], "Error: --image-size must be >= 8 pixels, got 4."),
        (["--headroom", "1.5"], "Error: headroom must be a fraction in [0, 1), got 1.5."),
        (["--requested", "0"], "Error: requested must be >= 1, got 0."),
        (["--memory-limit", "lots"], "Error: Cannot read the memory size 'lots'."),
        (["--device", "tpu"], "Error: Unknown device 'tpu'. Use one of: auto, mps, cuda, cuda:N, cpu."),
        (["--simulate", "16GiB"], "Error: Cannot read the simulation '16GiB'."),
        (["--memory-limit", "1000TiB", "--device", "cpu"], "Error: memory_limit 1024000.00 GiB is more than this machine's"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(args, message):
    result = runner.invoke(app, ["probe", *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)


def test_info_on_the_simulated_mac():
    result = runner.invoke(app, ["info", "--simulate", "mps:16GiB"])
    assert result.exit_code == 0, result.output
    assert "recommended max: 10.67 GiB (recommendedMaxWorkingSetSize)" in result.stdout
    assert "watermark ratio: 1.70 (default)" in result.stdout
    assert "limit: 12.00 GiB" in result.stdout


def test_the_console_script_runs_as_a_subprocess():
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    done = subprocess.run(
        [sys.executable, "-m", "mps_autobatch.cli", "probe", *TINY, "--device", "cpu", "--memory-limit", "2GiB",
         "--max-batch-size", "8", "--json"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batch_size"] == 8
