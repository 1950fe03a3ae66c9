"""`--batch-size auto` probes the trainer's own step: its reading agrees with what training then peaks at.

Simulated Mac, the synthetic dataset (460 training images): the probe's driver-memory reading at the size it
chose against the trainer's own peak over its first updates at that size (the ``measured_peak`` event).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from mps_autobatch.train import TrainConfig, train
from mps_autobatch.train.checkpoint import load_checkpoint
from mps_autobatch.train.commands import Display

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(tmp_path, name, **settings):
    defaults = dict(
        dataset="synthetic",
        model="test_efficientnet",
        image_size=96,
        epochs=1,
        workers=0,
        simulate="mps:16GiB",
        stop_after=5,
        probe_cache=False,
        output=str(tmp_path / name),
    )
    return TrainConfig(**{**defaults, **settings})


def _agreement(events):
    probe = next(e for e in events if e["event"] == "probe")
    measured = next(e for e in events if e["event"] == "measured_peak")
    assert measured["micro_batch_size"] == probe["batch_size"]
    return probe, measured, measured["peak_bytes"] / probe["peak_bytes"] - 1


@pytest.mark.parametrize(
    ("amp", "limit", "size", "updates"),
    [
        ("off", "400MiB", 74, 5),  # 75 and 86 before the policy module
        ("bf16", "300MiB", 85, 5),  # bf16 autocast runs on this CPU, as it would on a Mac's GPU
    ],
)
def test_the_probe_reads_what_the_first_updates_peak_at(tmp_path, amp, limit, size, updates):
    result = train(
        _config(tmp_path, "auto", amp=amp, memory_limit=limit, batch_size="auto"), display=Display(quiet=True)
    )
    probe, measured, gap = _agreement(result.events)
    assert (probe["batch_size"], measured["updates"]) == (size, updates)
    assert abs(gap) <= 0.03, f"probe {probe['peak_bytes']} vs training {measured['peak_bytes']}"
    # The event holds the probe's own trial at that size, which fits the budget.
    [trial] = [t for t in result.probe.trials if t.batch_size == size]
    assert trial.peak_bytes == probe["peak_bytes"] <= result.probe.budget_bytes
    assert result.probe.cached is False and result.micro_batch_size == size


def test_the_probe_leaves_the_run_exactly_as_a_run_at_that_size(tmp_path):
    # Weights, optimizer state and the random stream are restored: the run trains as if started at 74 directly.
    auto = train(_config(tmp_path, "auto", memory_limit="400MiB", batch_size="auto"), display=Display(quiet=True))
    fixed = train(_config(tmp_path, "fixed", memory_limit="400MiB", batch_size=74), display=Display(quiet=True))
    assert auto.micro_batch_size == fixed.micro_batch_size == 74
    a, b = load_checkpoint(tmp_path / "auto" / "last.pt"), load_checkpoint(tmp_path / "fixed" / "last.pt")
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name


def test_under_torchrun_the_ranks_probe_the_ddp_step_in_lockstep_and_agree_with_training(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args = [
        *launcher,
        "-m",
        "mps_autobatch.train",
        "--dataset=synthetic",
        "--model=test_efficientnet",
        "--image-size=96",
        "--epochs=1",
        "--batch-size=auto",
        "--amp=off",
        "--simulate=mps:16GiB",
        "--memory-limit=400MiB",
        "--workers=0",
        "--stop-after=5",
        "--no-probe-cache",
        f"--output={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=200)
    assert done.returncode == 0, done.stderr[-2000:]
    events = json.loads((tmp_path / "run" / "metrics.json").read_text())["events"]
    probe, measured, gap = _agreement(events)
    # Each rank trains on half of the 460 images: 230 // 74 = 3 updates before the epoch ends.
    assert (probe["batch_size"], measured["updates"]) == (74, 3)  # 75 before the policy module
    assert abs(gap) <= 0.03, f"probe {probe['peak_bytes']} vs training {measured['peak_bytes']}"
