import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_probe_and_train_runs_as_written():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "probe_and_train.py"), "--simulate", "--steps", "2"],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    safe = int(lines[0].split()[3])
    micro, steps = int(lines[1].split()[-1]), int(lines[1].split()[3])
    assert safe >= micro and micro * steps >= 48 and micro * (steps - 1) < 48
    assert lines[2].startswith("step 1: loss ") and lines[3].startswith("step 2: loss ")


def test_train_with_probe_runs_as_written(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_with_probe.py"), "--simulate", "--output", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    probe_line, train_line = done.stdout.splitlines()[-2:]
    safe = int(probe_line.split()[3])
    micro = int(train_line.split("micro-batch ")[1].split(")")[0])
    steps = -(-64 // safe)  # as few micro-batches as fit, of near-equal size: 31 -> 22 + 22 + 20
    assert micro == -(-64 // steps) <= safe
    assert train_line.startswith("trained 8 updates of 64 samples")  # 512 synthetic images, drop_last
    assert (tmp_path / "run" / "metrics.csv").exists() and (tmp_path / "run" / "last.pt").exists()


def test_text_classifier_runs_as_written():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "text_classifier.py"), "--simulate"],
        capture_output=True,
        text=True,
        env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    train, evaluation, longest = done.stdout.splitlines()
    assert train.startswith("train batch size 7 (trials [2, 16, ")
    assert evaluation.startswith("eval batch size 313 (trials [2, 16, 128, ")
    assert longest == "longest sample: index 24, 256 tokens"  # the dataset's maximum: seeded lengths 32-256
