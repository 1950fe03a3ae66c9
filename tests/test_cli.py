"""`autobatch` through typer's runner and as a subprocess."""

import json
import os
import subprocess
import sys

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


def test_probe_eval_sizes_the_forward_alone_and_is_cached_apart_from_training(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    args = ["probe", *TINY, "--simulate", "mps:16GiB", "--memory-limit", "256MiB", "--json"]
    train, evaluation = (json.loads(runner.invoke(app, args + extra).stdout) for extra in ([], ["--eval"]))
    assert (train["mode"], train["batch_size"], train["cached"]) == ("train", 331, False)
    assert (evaluation["mode"], evaluation["batch_size"], evaluation["cached"]) == ("eval", 1399, False)
    text = runner.invoke(app, ["probe", *TINY, "--simulate", "mps:16GiB", "--memory-limit", "256MiB", "--eval"])
    assert text.stdout.strip() == "1399" and "Recommended evaluation batch size (forward only): 1399" in text.stderr


def test_probe_prints_the_size_on_stdout_and_the_table_on_stderr():
    result = runner.invoke(app, ["probe", *TINY, "--device", "cpu", "--memory-limit", "2GiB", "--max-batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "16"
    assert "Recommended batch size: 16" in result.stderr


def test_info_on_the_simulated_mac():
    result = runner.invoke(app, ["info", "--simulate", "mps:16GiB"])
    assert result.exit_code == 0, result.output
    assert "recommended max: 10.67 GiB (recommendedMaxWorkingSetSize)" in result.stdout
    assert "watermark ratio: 1.70 (default)" in result.stdout
    assert "limit: 12.00 GiB" in result.stdout
    assert "in use now: 64.00 MiB" in result.stdout  # the simulated Mac's other allocations, nothing else yet
    assert "devices found: " in result.stdout and "cpu" in result.stdout


def test_the_console_script_runs_as_a_subprocess():
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mps_autobatch",
            "probe",
            *TINY,
            "--device",
            "cpu",
            "--memory-limit",
            "2GiB",
            "--max-batch-size",
            "8",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batch_size"] == 8


def _probe_json(*extra):
    result = runner.invoke(
        app, ["probe", *TINY, "--simulate", "mps:16GiB", "--memory-limit", "128MiB", "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_repeated_probe_comes_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    first = _probe_json()
    second = _probe_json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["trials"] == first["trials"] and second["batch_size"] == first["batch_size"]
    assert len(list(tmp_path.glob("*.json"))) == 1
    # Another optimizer or AMP setting changes memory: a miss, probed again.
    assert _probe_json("--optimizer", "sgd")["cached"] is False
    assert _probe_json("--amp", "bf16")["cached"] is False
    # A larger limit today still uses the answer found under the smaller one; a smaller limit does not.
    grown = _probe_json("--memory-limit", "150MiB")
    assert grown["cached"] is True and grown["limit_bytes"] == 128 * 2**20
    assert _probe_json("--memory-limit", "110MiB")["cached"] is False
    # ... and is stored beside the one found under 128 MiB, which still serves 128 MiB and more.
    assert len(list(tmp_path.glob("*.json"))) == 4
    assert _probe_json("--memory-limit", "150MiB")["limit_bytes"] == 128 * 2**20


def test_no_cache_probes_again(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    _probe_json()
    assert _probe_json("--no-cache")["cached"] is False
    result = runner.invoke(app, ["cache", "clear"])
    assert result.exit_code == 0 and "Removed 1 cached answer(s)" in result.stderr


def test_plot_writes_a_png(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    target = tmp_path / "mem.png"
    _probe_json("--plot", str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_prints_a_table_per_image_and_batch_size():
    result = runner.invoke(
        app,
        [
            "estimate",
            "--model",
            "test_efficientnet",
            "--num-classes",
            "10",
            "--image-size",
            "64",
            "--image-size",
            "256",
            "--batch-size",
            "2",
            "--batch-size",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1:3] for row in rows] == [
        ["         64 ", "          2 "], ["         64 ", "          8 "],
        ["        256 ", "          2 "], ["        256 ", "          8 "],
    ]  # fmt: skip


def test_estimate_calibrates_against_two_real_steps_on_the_simulated_mac():
    args = ["estimate", "--model", "test_efficientnet", "--num-classes", "10", "--image-size", "64", "--batch-size",
            "4", "--batch-size", "16", "--calibrate", "--simulate", "mps:16GiB"]  # fmt: skip
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["estimates"]
    assert [(r["image_size"], r["batch_size"]) for r in rows] == [(64, 4), (64, 16)]
    # The replay adds the allocator's rounding and cache to the tensors; the calibration, 64 MiB of other allocations.
    assert all(r["allocator_bytes"] > r["tensor_bytes"] for r in rows)
    assert all(r["calibrated_bytes"] > r["allocator_bytes"] + 62 * 2**20 for r in rows)
    text = runner.invoke(app, args)
    assert (
        "Calibrated on real steps at 4 and 8: device peak = tensors with the allocator's rounding and cache + "
        in " ".join(text.stdout.split())
    )


def test_plot_without_matplotlib_is_one_line_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = runner.invoke(
        app, ["probe", *TINY, "--simulate", "mps:16GiB", "--memory-limit", "128MiB", "--plot", str(tmp_path / "m.png")]
    )
    assert result.exit_code == 1
    assert (
        result.stderr.strip() == "Error: Plotting needs matplotlib. Install it with: pip install 'mps-autobatch[plot]'"
    )
