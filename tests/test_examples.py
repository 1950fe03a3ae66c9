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
