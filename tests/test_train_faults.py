"""What goes wrong in a training run (issue #6): killed while writing last.pt, Ctrl-C, an unreadable last.pt."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import typer
from typer.testing import CliRunner

from mps_autobatch.train import TrainConfig, TrainingInterrupted, train
from mps_autobatch.train._setup import create_model, seed_everything
from mps_autobatch.train.checkpoint import KILL_HOOK, NOTE, load_checkpoint, prepare_output
from mps_autobatch.train.commands import Display, register

QUIET = Display(quiet=True)
# 64 synthetic images of 32 px in optimisation batches of 16: 4 updates per epoch, 8 in all.
RUN = dict(dataset="synthetic", model="test_efficientnet", image_size=32, epochs=2, batch_size=16, dev_samples=64)
RUN |= dict(seed=3, workers=0)
# One OpenMP thread, as in this process (`one_torch_thread`): the same sums in the same order, so equal weights.
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
RESUME = "run the same command with --resume to continue"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run every interrupted one must end up equal to: its result and final weights."""
    result = train(TrainConfig(**RUN, output=str(tmp_path_factory.mktemp("full") / "run")), display=QUIET)
    return result, load_checkpoint(result.output_dir / "last.pt")["model"]


def _assert_same_weights(folder, expected):
    actual = load_checkpoint(folder / "last.pt")["model"]
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[name], expected[name]) for name in expected)


def _args(settings):
    """`TrainConfig` settings as `autobatch train` options."""
    return [text for name, value in settings.items() for text in (f"--{name.replace('_', '-')}", str(value))]


def _cli(folder, *args, env=None, settings=RUN):
    command = [sys.executable, "-m", "mps_autobatch.train", *_args(settings), "--output", str(folder), *args]
    return subprocess.Popen(
        command, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


def _position(folder):
    state = load_checkpoint(folder / "last.pt")["state"]
    return state["epoch"], state["batches_done"], state["update"]


def _rows(folder):
    return json.loads((folder / "metrics.json").read_text())["epochs"]


# --- killed while writing a checkpoint --------------------------------------------------------------------


def test_a_kill_while_writing_last_pt_keeps_the_previous_one_and_resume_finishes_the_run(tmp_path, uninterrupted):
    full, expected = uninterrupted
    out = tmp_path / "run"
    # SIGKILL at the second write of last.pt (the end of epoch 2), after its temporary file is fsynced.
    code, stdout, stderr = _finish(_cli(out, env={KILL_HOOK: "last.pt:2"}))
    assert code == -signal.SIGKILL, stderr
    assert stdout == "" and "epoch 1/2" in stderr and "epoch 2/2" not in stderr
    temporary = sorted(path.name for path in out.glob(".*"))
    assert len(temporary) == 1 and re.fullmatch(r"\.last\.pt\.\w+\.tmp", temporary[0]), temporary
    assert sorted(p.name for p in out.iterdir()) == [*temporary, "best.pt", "last.pt", "metrics.csv", "metrics.json"]
    assert _position(out) == (1, 0, 4)  # epoch 1's checkpoint, whole
    assert load_checkpoint(out / temporary[0])["state"]["update"] == 8  # epoch 2's, written but never renamed
    before = _rows(out)
    assert [row["epoch"] for row in before] == [1]

    code, stdout, stderr = _finish(_cli(out, "--resume"))
    assert code == 0, stderr
    assert stdout.strip() == str(out) and "epoch 2/2" in stderr and "epoch 1/2" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.csv", "metrics.json"]
    after = _rows(out)
    assert after[0] == before[0]  # epoch 1's row, as written before the kill
    assert [(row["epoch"], row["update"]) for row in after] == [(1, 4), (2, 8)]
    assert [(r["train_loss"], r["val_loss"]) for r in after] == [(r["train_loss"], r["val_loss"]) for r in full.epochs]
    _assert_same_weights(out, expected)


def test_a_new_run_and_a_resumed_one_delete_the_temporary_files_of_a_killed_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    left = [out / ".last.pt.a1b2c3.tmp", out / ".metrics.json.d4e5f6.tmp", out / "notes.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    assert prepare_output(TrainConfig(**RUN, output=str(out))) is None
    assert sorted(p.name for p in out.iterdir()) == ["notes.tmp"]

    torch.save({"model": {}, "config": TrainConfig(**RUN).to_dict()}, out / "last.pt")
    left[0].write_bytes(b"half a file")
    assert prepare_output(TrainConfig(**RUN, output=str(out), resume=True))["model"] == {}
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "notes.tmp"]


# --- Ctrl-C -----------------------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """Python's own SIGINT handler, whatever pytest was started with.

    A shell that starts a job in the background (`nohup pytest &`) has it ignore SIGINT, `train` rightly leaves an
    ignored SIGINT alone, and a child process inherits the ignoring; a handler set here resets to the default there.
    """
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _model_pressing_ctrl_c(update, presses):
    """The model `train` would create, which sends itself SIGINT ``presses`` times in update ``update``'s forward."""
    seed_everything(RUN["seed"])
    model = create_model(RUN["model"], 10, pretrained=False, weights=None)
    forwards = 0

    def press(module, args):
        nonlocal forwards
        forwards += module.training  # evaluation's forwards do not count
        if module.training and forwards == update:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)

    model.register_forward_pre_hook(press)
    return model


@pytest.mark.usefixtures("ctrl_c_as_in_a_terminal")
def test_ctrl_c_finishes_the_update_saves_it_and_resume_gives_the_same_weights(tmp_path, uninterrupted, capsys):
    full, expected = uninterrupted
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted) as caught:
        train(TrainConfig(**RUN, output=str(out)), model=_model_pressing_ctrl_c(3, presses=1), display=QUIET)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.checkpoint == out / "last.pt"
    assert (
        str(caught.value)
        == f"Interrupted after update 3 (epoch 1, 3 of 4 batches done): saved {out}/last.pt; {RESUME}."
    )
    assert capsys.readouterr().err == NOTE + "\n"
    assert _position(out) == (0, 3, 3)  # update 3 finished after the Ctrl-C, and counted

    resumed = train(TrainConfig(**RUN, output=str(out), resume=True), display=QUIET)
    assert resumed.updates == 8
    assert [(r["train_loss"], r["val_loss"]) for r in resumed.epochs] == [
        (r["train_loss"], r["val_loss"]) for r in full.epochs
    ]
    _assert_same_weights(out, expected)


@pytest.mark.usefixtures("ctrl_c_as_in_a_terminal")
def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(tmp_path, uninterrupted, capsys):
    _, expected = uninterrupted
    out = tmp_path / "run"
    config = TrainConfig(**RUN, output=str(out), checkpoint_every=2)  # last.pt after update 2
    with pytest.raises(TrainingInterrupted) as caught:
        train(config, model=_model_pressing_ctrl_c(3, presses=2), display=QUIET)
    assert caught.value.checkpoint is None
    assert str(caught.value) == (
        f"Interrupted in the middle of an update: nothing saved; {RESUME} from {out}/last.pt, the last checkpoint."
    )
    assert capsys.readouterr().err == NOTE + "\n"
    assert _position(out) == (0, 2, 2)  # half of update 3 is not in it

    train(TrainConfig(**RUN, output=str(out), resume=True), display=QUIET)
    _assert_same_weights(out, expected)


@pytest.mark.usefixtures("ctrl_c_as_in_a_terminal")
def test_ctrl_c_in_the_cli_prints_one_line_and_exits_130(tmp_path):
    # Three epochs of 8 updates: when last.pt first appears (after update 1) the run is far from its end.
    settings = {**RUN, "epochs": 3, "dev_samples": 128}
    expected = train(TrainConfig(**settings, output=str(tmp_path / "full")), display=QUIET)
    assert expected.updates == 24
    out = tmp_path / "run"
    process, deadline = _cli(out, "--checkpoint-every", "1", settings=settings), time.monotonic() + 120
    while not (out / "last.pt").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"No last.pt: {_finish(process)}")
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    code, stdout, stderr = _finish(process)
    assert code == 130, stderr
    assert stdout == "" and "Traceback" not in stderr
    *before, last = stderr.strip().splitlines()
    pattern = rf"Interrupted after update (\d+) \(epoch (\d), (\d) of 8 batches done\): saved (.+); {RESUME}\."
    match = re.fullmatch(pattern, last)
    assert match and match[4] == str(out / "last.pt"), last
    assert all(line == NOTE or re.match(r"epoch [12]/3  train loss", line) for line in before), before
    update, epoch, done = int(match[1]), int(match[2]), int(match[3])
    assert 1 <= update < 24 and update == 8 * (epoch - 1) + done
    assert _position(out) == (epoch - 1, done, update)

    code, stdout, stderr = _finish(_cli(out, "--resume", settings=settings))
    assert code == 0, stderr
    _assert_same_weights(out, load_checkpoint(expected.output_dir / "last.pt")["model"])


# --- an unreadable last.pt --------------------------------------------------------------------------------


def _torch_file(state, keep=None):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()[:keep]


@pytest.mark.parametrize(
    ("content", "best", "reason", "fix"),
    [
        (
            b"garbage bytes",
            False,
            "damaged or not a torch file (pickle data was truncated)",
            "Pass another --output to start a new run.",
        ),
        (
            _torch_file({"model": {"weight": torch.ones(1000)}}, keep=2000),
            True,
            "damaged or not a torch file (PytorchStreamReader failed reading zip archive: failed finding central "
            "directory)",
            "Copy best.pt over it to resume from the best epoch, or pass another --output to start a new run.",
        ),
        (
            _torch_file({"weights": [1.0]}),
            False,
            "not an autobatch training checkpoint (no model state in it)",
            "Pass another --output to start a new run.",
        ),
    ],
    ids=["garbage", "truncated", "not-a-checkpoint"],
)
def test_resuming_from_an_unreadable_last_pt_is_one_error_line_and_exit_code_2(tmp_path, content, best, reason, fix):
    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(content)
    if best:
        (out / "best.pt").write_bytes(b"kept")
    result = CliRunner().invoke(app, ["train", *_args(RUN), "--output", str(out), "--resume"])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"Error: Cannot resume from '{out}/last.pt': {reason}. {fix}"]
    assert (out / "last.pt").read_bytes() == content  # left as it was, for a look
