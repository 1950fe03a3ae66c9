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


def test_text_classifier_runs_as_written(monkeypatch, capsys):
    train, evaluation, longest = _run_in_process("text_classifier.py", monkeypatch, capsys)[-3:]
    assert train == "train batch size 10 (trials [2, 16, 11, 9, 10])"
    assert evaluation == "eval batch size 691 (trials [2, 16, 128, 691, 720])"
    assert longest == "longest sample: index 24, 256 tokens"  # the dataset's maximum: seeded lengths 32-256


def _run_in_process(name: str, monkeypatch, capsys) -> list[str]:  # type: ignore[no-untyped-def]
    """An example as `python examples/<name> --simulate` runs it, in this process (Lightning and transformers are
    imported once for the whole suite)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [name, "--simulate"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out.splitlines()


def test_lightning_mps_runs_as_written(monkeypatch, capsys):
    largest, plan, trained = _run_in_process("lightning_mps.py", monkeypatch, capsys)[-3:]
    assert largest.startswith("largest safe batch ") and " trials" in largest
    micro, steps = int(plan.split()[1]), int(plan.split()[4].rstrip(":"))
    assert plan.endswith("(micro-batch x accumulation).") and micro * steps == 4096  # a divisor: exact
    assert trained == "trained 2 updates"


def test_hf_trainer_mps_runs_as_written(monkeypatch, capsys):
    lines = _run_in_process("hf_trainer_mps.py", monkeypatch, capsys)
    largest, plan, trained = (next(line for line in lines if line.startswith(p)) for p in ("largest", "per", "trained"))
    assert largest.startswith("largest safe batch ")
    micro, steps = int(plan.split()[2]), int(plan.split()[5])
    assert micro * steps == 64 and plan.split()[7].rstrip(";") == "64"
    assert trained == "trained 4 updates"  # 256 samples, 64 per update
