"""Bad input to `autobatch`: one `Error: ...` line naming the problem and the fix, exit code 2, nothing on stdout.

Every case fails before a model is built (timm's meta-device config aside). A corrupt cache file is not bad input:
one warning line, then the probe runs and rewrites it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import food101_fixture as fx
import pytest
from typer.testing import CliRunner

from mps_autobatch.cli import app

runner = CliRunner()
GARBAGE = b"\x00 garbage, not a checkpoint \xff" * 8
WATERMARK = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"


def _one_error_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(message), lines[0]


# --- autobatch probe ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "efficientnet_bo"],
            "Error: Unknown timm model 'efficientnet_bo'. Did you mean 'efficientnet_b0'?",
        ),
        (["--image-size", "4"], "Error: --image-size must be >= 8 pixels, got 4. Pass e.g. --image-size 224."),
        (["--headroom", "1.5"], "Error: --headroom must be a fraction in [0, 1), got 1.5."),
        (
            ["--headroom", "1.0"],
            "Error: --headroom must be a fraction in [0, 1), got 1.0. The default 0.2 keeps 20% free.",
        ),
        (
            ["--headroom", "-0.1"],
            "Error: --headroom must be a fraction in [0, 1), got -0.1. The default 0.2 keeps 20% free.",
        ),
        (["--requested", "0"], "Error: --requested must be >= 1, got 0."),
        (
            ["--max-batch-size", "0"],
            "Error: --max-batch-size must be >= 1, got 0. Pass the largest size worth probing, e.g. the dataset "
            "length.",
        ),
        (["--memory-limit", "lots"], "Error: Cannot read the memory size 'lots'."),
        (["--device", "tpu"], "Error: Unknown device 'tpu'. Use one of: auto, mps, cuda, cuda:N, cpu."),
        (["--simulate", "16GiB"], "Error: Cannot read the simulation '16GiB'."),
        (
            ["--memory-limit", "1000TiB", "--device", "cpu"],
            "Error: memory_limit 1024000.00 GiB is more than this machine's",
        ),
        (
            ["--simulate", "mps:16GiB", "--memory-limit", "64GiB"],
            "Error: memory_limit 64.00 GiB is more than this Mac's 16.00 GiB of unified memory. "
            "Pass a smaller memory limit.",
        ),
    ],
)
def test_probe_bad_input_is_one_error_line_and_exit_code_2(args, message):
    _one_error_line(["probe", *args], message)


# --- autobatch train ---------------------------------------------------------------------------------------------


@pytest.fixture
def train_args(tmp_path: Path) -> list[str]:
    """A tiny run into tmp_path that would start training if nothing were wrong."""
    return ["train", "--model", "test_efficientnet", "--image-size", "32", "--dataset", "synthetic", "--epochs", "1",
            "--batch-size", "4", "--dev-samples", "8", "--workers", "0", "--output", str(tmp_path / "run")]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--batch-size", "-4"],
            "Error: --batch-size must be an integer >= 1, got -4. "
            "Pass a positive --batch-size, or auto to probe for one.",
        ),
        (["--image-size", "4"], "Error: --image-size must be >= 8 pixels, got 4. Pass e.g. --image-size 224."),
        (["--device", "tpu"], "Error: Unknown device 'tpu'. Use one of: auto, mps, cuda, cuda:N, cpu."),
        (["--memory-limit", "lots"], "Error: Cannot read the memory size 'lots'."),
        (
            ["--memory-limit", "1000TiB", "--device", "cpu"],
            "Error: memory_limit 1024000.00 GiB is more than this machine's",
        ),
        (
            ["--simulate", "mps:16GiB", "--memory-limit", "64GiB"],
            "Error: memory_limit 64.00 GiB is more than this Mac's 16.00 GiB of unified memory. "
            "Pass a smaller memory limit.",
        ),
    ],
)
def test_train_bad_input_is_one_error_line_and_exit_code_2(train_args, args, message):
    # Later options win: each case overrides one of the tiny run's settings.
    _one_error_line([*train_args, *args], message)


@pytest.mark.parametrize("command", ["probe", "train"])
def test_an_unreadable_watermark_ratio_is_one_error_line(command, train_args, monkeypatch):
    monkeypatch.setenv(WATERMARK, "abc")
    args = ["probe"] if command == "probe" else train_args
    _one_error_line(
        [*args, "--simulate", "mps:16GiB"],
        "Error: PYTORCH_MPS_HIGH_WATERMARK_RATIO='abc' is not a ratio between 0.0 and 2.0. "
        "Unset it, or set it to e.g. 1.7 (0.0 disables the limit).",
    )


# --- datasets ----------------------------------------------------------------------------------------------------


def _imagefolder_without_class_folders(tmp: Path) -> tuple[str, str]:
    folder = tmp / "pets"
    fx.write_jpeg(folder / "cat.jpg", seed=0)
    fx.write_jpeg(folder / "dog.jpg", seed=1)
    return (
        f"imagefolder:{folder}",
        f"Error: No images found in '{folder}'. Put each class's .jpg/.png files in its own sub-folder, "
        f"e.g. '{folder / 'cat' / '001.jpg'}'.",
    )


def _food101(tmp: Path, missing: str | None) -> Path:
    data = tmp / "data"
    if missing is None:
        data.mkdir()
        return data
    fx.write_food101(data)
    target = data / "food-101" / missing
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    return data


@pytest.mark.parametrize(
    ("missing", "what"),
    [
        (None, "'{data}/food-101' is missing"),
        ("meta", "'{data}/food-101/meta/classes.txt' is missing"),
        ("meta/test.txt", "'{data}/food-101/meta/test.txt' is missing"),
        ("images/churros/0.jpg", "'{data}/food-101/images/churros/0.jpg' is missing"),
    ],
    ids=["absent", "no-meta", "no-test-list", "an-image-short"],
)
def test_a_missing_or_partial_food101_is_one_error_line(missing, what, train_args, tmp_path):
    data = _food101(tmp_path, missing)
    _one_error_line(
        [*train_args, "--dataset", "food-101", "--data-dir", str(data), "--device", "cpu"],
        f"Error: Food-101 not found: {what.format(data=data)}. Download it with: autobatch train --dataset "
        f"food-101 --data-dir {data} --download",
    )


def test_an_image_folder_without_class_folders_is_one_error_line(train_args, tmp_path):
    dataset, message = _imagefolder_without_class_folders(tmp_path)
    _one_error_line([*train_args, "--dataset", dataset, "--device", "cpu"], message)


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_evaluate_and_predict_refuse_a_garbage_checkpoint_in_one_line(tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(GARBAGE)
    message = f"Error: Cannot read checkpoint '{checkpoint}': damaged or not a torch file ("
    _one_error_line(["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu"], message)
    _one_error_line(["predict", "--checkpoint", str(checkpoint), "--device", "cpu", str(tmp_path / "a.jpg")], message)


def test_resume_refuses_a_garbage_last_checkpoint_in_one_line(train_args, tmp_path):
    last = tmp_path / "run" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(GARBAGE)
    result = runner.invoke(app, [*train_args, "--device", "cpu", "--resume"])
    assert (result.exit_code, result.stdout) == (2, ""), result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: Cannot resume from '{last}': damaged or not a torch file (")
    assert line.endswith("). Pass another --output to start a new run.")


# --- the probe cache ---------------------------------------------------------------------------------------------

PROBE = ["probe", "--model", "test_efficientnet", "--image-size", "32", "--device", "cpu", "--memory-limit",
         "512MiB", "--num-classes", "10", "--max-batch-size", "8", "--json"]  # fmt: skip


def _probe(expect_cached: bool) -> tuple[dict, str]:
    result = runner.invoke(app, PROBE)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cached"] is expect_cached
    return data, result.stderr


def _stored(path: Path, printed: dict) -> None:
    """The cache file is valid JSON holding the answer just printed."""
    entry = json.loads(path.read_text(encoding="utf-8"))
    assert entry["key"]["model"] == "test_efficientnet"
    assert entry["result"] == {k: v for k, v in printed.items() if k not in ("model", "image_size")}


def test_a_corrupt_cache_file_is_one_warning_and_is_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    first, stderr = _probe(expect_cached=False)
    assert stderr == ""
    [path] = tmp_path.glob("*.json")
    whole = path.read_bytes()
    for damage, reason in [
        (b"\x00\xff not json", "'utf-8' codec can't decode byte 0xff in position 1: invalid start byte"),
        (whole[: whole.index(b'"result"')], "Expecting property name enclosed in double quotes: line "),  # cut short
        (b'{"key": {}, "result": {}}', "its key does not match its name"),
    ]:
        path.write_bytes(damage)
        again, stderr = _probe(expect_cached=False)
        assert stderr.startswith(f"Warning: Ignoring unreadable cache file '{path}' ({reason}")
        assert stderr.endswith("); it will be rewritten after this probe.\n") and stderr.count("\n") == 1
        assert again["batch_size"] == first["batch_size"] == 8
        _stored(path, again)
        assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
        hit, stderr = _probe(expect_cached=True)
        assert stderr == "" and hit["trials"] == again["trials"]
