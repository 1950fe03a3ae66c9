"""The bundled trainer: metrics and checkpoints, exact resume, out-of-memory recovery, real learning, the CLI."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from mps_autobatch.train import TrainConfig, TrainingOutOfMemory, train
from mps_autobatch.train.checkpoint import METRIC_COLUMNS, load_checkpoint
from mps_autobatch.train.commands import Display, register
from mps_autobatch.train.data import EpochBatches

runner = CliRunner()
QUIET = Display(quiet=True)
TINY = ["--model", "test_efficientnet", "--image-size", "32", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cli_app():
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return app


def _synthetic(tmp_path, name="run", **settings):
    defaults = dict(dataset="synthetic", model="test_efficientnet", image_size=32, epochs=1, workers=0)
    return TrainConfig(**{**defaults, "output": str(tmp_path / name), **settings})


def _weights(folder):
    return load_checkpoint(Path(folder) / "last.pt")["model"]


# --- metrics and checkpoints ------------------------------------------------------------------------------


def test_a_short_run_writes_metrics_and_checkpoints(tmp_path, cli_app):
    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", *TINY, "--epochs", "2", "--batch-size", "16"]
    result = runner.invoke(
        cli_app, [*args, "--effective-batch-size", "32", "--dev-samples", "128", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "epoch 2/2" in result.stderr

    with open(out / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert [(r["epoch"], r["update"], r["micro_batch_size"], r["accumulation_steps"]) for r in rows] == [
        ("1", "4", "16", "2"),
        ("2", "8", "16", "2"),
    ]
    document = json.loads((out / "metrics.json").read_text())
    assert [row["val_top1"] for row in document["epochs"]] == [float(r["val_top1"]) for r in rows]
    assert document["classes"] == [f"class_{i}" for i in range(10)] and document["config"]["epochs"] == 2

    last, best = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    expected = {"model", "optimizer", "scheduler", "scaler", "rng", "state", "config", "metrics", "classes"}
    assert expected <= set(last)
    assert set(last["rng"]) == {"python", "numpy", "torch"}
    position = last["state"]
    assert (position["epoch"], position["batches_done"], position["update"]) == (2, 0, 8)
    assert last["scheduler"]["total_updates"] == 8 and last["metrics"] == document["epochs"]
    best_epoch = max(document["epochs"], key=lambda row: row["val_top1"])["epoch"]
    assert best["state"]["epoch"] == best_epoch
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.csv", "metrics.json"]


def test_the_training_order_depends_only_on_seed_and_epoch():
    sampler = EpochBatches(10, 3, seed=7)
    first = list(sampler)
    sampler.set_position(0, 2)
    assert list(sampler) == first[2:] and len(first) == 3  # drop_last: 10 // 3 full batches
    sampler.set_position(1, 0)
    assert list(sampler) != first and all(epoch == 1 for batch in sampler for epoch, _ in batch)


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    from mps_autobatch.devices import get_backend
    from mps_autobatch.step import TrainingStep
    from mps_autobatch.train.engine import forward_backward_retrying

    torch.manual_seed(0)
    model, images, labels = nn.Linear(4, 3), torch.randn(7, 4), torch.randint(3, (7,))
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy)
    nn.functional.cross_entropy(model(images), labels).backward()
    full = model.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    loss, micro = forward_backward_retrying(step, get_backend("cpu"), images, labels, 3, print)
    assert micro == 3 and torch.allclose(model.weight.grad, full)  # micro-batches of 3, 3 and 1, weighted by share
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(model(images), labels).item())


def test_progress_bars_show_on_a_terminal(tmp_path):
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=150)
    train(_synthetic(tmp_path, batch_size=16, dev_samples=32), display=Display(console))
    text = console.file.getvalue()
    assert "img/s" in text and "epoch 1/1  train loss" in text


# --- exact resume -----------------------------------------------------------------------------------------


def _with_dropout():
    # Dropout and stochastic depth draw from the global RNG at every step: exact only if resume restores it.
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=10, drop_rate=0.3, drop_path_rate=0.2)


def test_resume_after_interruptions_gives_the_same_weights(tmp_path):
    settings = dict(epochs=2, batch_size=16, dev_samples=96, workers=2, seed=3)
    full = train(_synthetic(tmp_path, "full", **settings), model=_with_dropout(), display=QUIET)

    # Interrupted mid-epoch 1 (update 4 of 6), then mid-epoch 2, then run to the end.
    first = train(_synthetic(tmp_path, "parts", stop_after=4, **settings), model=_with_dropout(), display=QUIET)
    saved = load_checkpoint(tmp_path / "parts" / "last.pt")["state"]
    assert first.stopped and (saved["epoch"], saved["batches_done"], saved["update"]) == (0, 4, 4)
    resumed = _synthetic(tmp_path, "parts", stop_after=4, resume=True, **settings)
    second = train(resumed, model=_with_dropout(), display=QUIET)
    assert second.stopped and second.updates == 8
    last = train(_synthetic(tmp_path, "parts", resume=True, **settings), model=_with_dropout(), display=QUIET)
    assert not last.stopped and last.updates == full.updates == 12

    expected, actual = _weights(tmp_path / "full"), _weights(tmp_path / "parts")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    for before, after in zip(full.epochs, last.epochs):
        assert (before["train_loss"], before["val_loss"]) == (after["train_loss"], after["val_loss"])


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    train(_synthetic(tmp_path, batch_size=32, dev_samples=64), display=QUIET)
    with pytest.raises(ValueError, match="Cannot resume .*: seed=1, but the checkpoint was trained with seed=0"):
        train(_synthetic(tmp_path, batch_size=32, dev_samples=64, seed=1, resume=True), display=QUIET)
    with pytest.raises(ValueError, match="already holds a run. Pass --resume to continue it"):
        train(_synthetic(tmp_path, batch_size=32, dev_samples=64), display=QUIET)


# --- out-of-memory recovery on the simulated Mac ----------------------------------------------------------


def _net(batchnorm: bool) -> nn.Module:
    """A small conv net whose activations dominate its memory; with BatchNorm after each convolution or not."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d if batchnorm else lambda _: nn.Identity()
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


# 64 px images, 64 per optimisation batch, SGD (linear in the gradient, so accumulation matches to rounding).
OOM_RUN = dict(image_size=64, epochs=2, dev_samples=128, optimizer="sgd", lr=0.05)


def _oom_events(result):
    ooms = [e for e in result.events if e["event"] == "oom"]
    return [(e["micro_batch_size"], e["new_micro_batch_size"], e["accumulation_steps"]) for e in ooms]


def test_oom_halves_the_micro_batch_and_keeps_the_batch_without_batchnorm(tmp_path):
    # Limits found on the simulation (208-228 MiB): a micro-batch of 64 runs out of memory and 32 fits.
    limited = _synthetic(tmp_path, "sim", batch_size=64, simulate="mps:16GiB", memory_limit="218MiB", **OOM_RUN)
    recovered = train(limited, model=_net(batchnorm=False), display=QUIET)
    reference = train(_synthetic(tmp_path, "cpu", batch_size=64, **OOM_RUN), model=_net(batchnorm=False), display=QUIET)

    assert _oom_events(recovered) == [(64, 32, 2)] and _oom_events(reference) == []
    assert [(r["micro_batch_size"], r["accumulation_steps"], r["effective_batch_size"]) for r in recovered.epochs] == [
        (32, 2, 64),
        (32, 2, 64),
    ]
    assert [r["oom_retries"] for r in recovered.epochs] == [1, 0] and recovered.updates == reference.updates == 4
    for ours, theirs in zip(recovered.epochs, reference.epochs):
        assert np.allclose([ours["train_loss"], ours["val_loss"]], [theirs["train_loss"], theirs["val_loss"]])
    expected, actual = _weights(tmp_path / "cpu"), _weights(tmp_path / "sim")
    assert all(torch.allclose(expected[name], actual[name], atol=1e-5) for name in expected)


def test_oom_restores_batchnorm_running_stats(tmp_path):
    # A run that fails at 64 and re-runs at 32 must equal a run at 32 from the start, running statistics
    # included: the failed pass had already updated them. (64 fails and 32 fits at 230-255 MiB.)
    limited = _synthetic(tmp_path, "sim", batch_size=64, simulate="mps:16GiB", memory_limit="245MiB", **OOM_RUN)
    recovered = train(limited, model=_net(batchnorm=True), display=QUIET)
    at_32 = _synthetic(tmp_path, "cpu", batch_size=32, effective_batch_size=64, **OOM_RUN)
    reference = train(at_32, model=_net(batchnorm=True), display=QUIET)

    assert _oom_events(recovered) == [(64, 32, 2)]
    expected, actual = _weights(tmp_path / "cpu"), _weights(tmp_path / "sim")
    stats = [name for name in expected if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 6 and int(actual["1.num_batches_tracked"]) == 2 * 4  # two micro-batches per update
    assert all(torch.allclose(expected[name], actual[name], atol=1e-5) for name in expected)
    assert [r["val_loss"] for r in recovered.epochs] == pytest.approx([r["val_loss"] for r in reference.epochs])


def test_oom_gives_up_after_three_halvings_with_one_clear_error(tmp_path):
    # 80 MiB: the model and the simulated Mac's 64 MiB of other allocations fit, a micro-batch of 8 does not.
    limited = _synthetic(tmp_path, batch_size=64, simulate="mps:16GiB", memory_limit="80MiB", **OOM_RUN)
    with pytest.raises(TrainingOutOfMemory) as caught:
        train(limited, model=_net(batchnorm=False), display=QUIET)
    message = str(caught.value)
    assert message.startswith("Out of memory even at micro-batch 8 (from 64, after 3 halvings at most): MPS backend")
    assert message.endswith("Pass a smaller --image-size or model, or a larger --memory-limit.")
    assert "\n" not in message and "PYTORCH_MPS_HIGH_WATERMARK_RATIO" not in message


def test_auto_batch_size_probes_the_simulated_mac_and_uses_the_cache(tmp_path, cli_app, monkeypatch):
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "cache"))
    args = ["train", "--dataset", "synthetic", *TINY, "--epochs", "1", "--dev-samples", "64", "--batch-size", "auto"]
    args += ["--simulate", "mps:16GiB", "--memory-limit", "256MiB", "--effective-batch-size", "64", "--json"]
    first = runner.invoke(cli_app, [*args, "--output", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    probe = data["events"][0]
    assert probe["event"] == "probe" and probe["device"] == "sim-mps" and probe["limit_bytes"] == 256 * 2**20
    micro = data["micro_batch_size"]
    assert micro <= probe["batch_size"] and data["effective_batch_size"] == 64
    assert data["epochs"][0]["accumulation_steps"] == -(-64 // micro)
    assert "Trials on sim-mps" in first.stderr
    second = runner.invoke(cli_app, [*args, "--output", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    assert "from the probe cache" in second.stderr and json.loads(second.stdout)["micro_batch_size"] == micro


# --- learning on real images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """scikit-learn's 1,797 8x8 digits as a 32x32 PNG image folder, trained for 20 epochs."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / "images" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).convert("RGB")
        image.resize((32, 32), Image.Resampling.NEAREST).save(folder / f"{index:04d}.png")
    config = TrainConfig(
        dataset=f"imagefolder:{root / 'images'}",
        model="test_resnet",
        image_size=32,
        pretrained=False,
        epochs=20,
        batch_size=64,
        lr=3e-3,
        workers=0,
        output=str(root / "run"),
    )
    return root, train(config, display=QUIET)


def test_training_on_real_digits_reaches_90_percent(digits_run):
    _, result = digits_run
    assert len(result.epochs) == 20
    assert result.epochs[-1]["val_top1"] >= 0.90, [row["val_top1"] for row in result.epochs]
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


def test_evaluate_and_predict_a_trained_checkpoint(digits_run, cli_app):
    root, result = digits_run
    checkpoint = str(root / "run" / "last.pt")
    evaluated = runner.invoke(cli_app, ["evaluate", "--checkpoint", checkpoint, "--workers", "0"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["split"] == "val" and abs(metrics["images"] - 180) <= 5  # 10% of each class held out
    assert metrics["top1"] == pytest.approx(result.epochs[-1]["val_top1"])

    images = [str(root / "images" / digit / name) for digit, name in (("3", "0003.png"), ("7", "0007.png"))]
    predicted = runner.invoke(cli_app, ["predict", "--checkpoint", checkpoint, *images, "--json"])
    assert predicted.exit_code == 0, predicted.output
    answers = json.loads(predicted.stdout)
    assert [len(item["top"]) for item in answers] == [5, 5]
    assert [item["top"][0]["class"] for item in answers] == ["3", "7"]
    assert all(sum(entry["probability"] for entry in item["top"]) <= 1.0 + 1e-6 for item in answers)


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "Error: --batch-size must be an integer >= 1, got 0."),
        (["--batch-size", "lots"], "Error: --batch-size must be a positive integer or auto, got 'lots'."),
        (["--epochs", "0"], "Error: --epochs must be an integer >= 1, got 0."),
        (["--eval-batch-size", "0"], "Error: --eval-batch-size must be an integer >= 1, got 0."),
        (["--eval-batch-size", "big"], "Error: --eval-batch-size must be a positive integer or auto, got 'big'."),
        (
            ["--model", "efficientnet_bo"],
            "Error: Unknown timm model 'efficientnet_bo'. Did you mean 'efficientnet_b0'?",
        ),
        (["--amp", "fp16"], "Error: amp 'fp16' is for CUDA GPUs. On the CPU use 'bf16' or 'off'."),
        (["--dataset", "imagefolder:/no/such/dir"], "Error: Image folder '/no/such/dir' not found."),
        (["--dataset", "mnist"], "Error: Unknown dataset 'mnist'."),
        (["--resume"], "Error: Nothing to resume:"),
        (["--weights", "/no/such.pth"], "Error: Weights file '/no/such.pth' not found."),
        (["--simulate", "mps:16GiB", "--device", "cpu"], "Error: --simulate replaces the device"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, cli_app, args, message):
    base = ["train", "--dataset", "synthetic", "--device", "cpu", "--batch-size", "8", "--output", str(tmp_path)]
    result = runner.invoke(cli_app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_evaluate_and_predict_report_bad_input(tmp_path, cli_app):
    missing = runner.invoke(cli_app, ["evaluate", "--checkpoint", str(tmp_path / "none.pt")])
    assert missing.exit_code == 2 and missing.stderr.strip().startswith("Error: Checkpoint ")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    train(_synthetic(tmp_path, batch_size=32, dev_samples=32), display=QUIET)
    broken = runner.invoke(
        cli_app, ["predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), str(tmp_path / "broken.png")]
    )
    assert broken.exit_code == 2 and broken.stderr.strip().startswith("Error: Cannot read image ")
    assert len(broken.stderr.strip().splitlines()) == 1


def test_unavailable_pretrained_weights_say_to_pass_no_pretrained(tmp_path):
    # The real path: `python -m mps_autobatch.train` with the hub unreachable (offline mode answers at once).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "mps_autobatch.train", "--dataset", "synthetic", "--pretrained", *TINY]
    command += ["--batch-size", "8", "--output", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Could not load pretrained weights for 'test_efficientnet'")
    assert lines[0].endswith("Pass --weights FILE with a local copy, or --no-pretrained to train from scratch.")
