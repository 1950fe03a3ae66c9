"""The trainer's evaluation batch: probed apart from training, and halved alone when evaluation runs out of memory.

Simulated Mac, the synthetic dataset, the small conv net of the out-of-memory tests (SGD, no BatchNorm): what
changes because of evaluation is the evaluation batch, never the micro-batch or the effective batch.
"""

import pytest
from test_train_engine import OOM_RUN, _net

from mps_autobatch.train import TrainConfig, train
from mps_autobatch.train.commands import Display

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUIET = Display(quiet=True)


def _config(tmp_path, name, **settings):
    defaults = dict(dataset="synthetic", model="test_efficientnet", workers=0, val_fraction=0.5, probe_cache=False)
    return TrainConfig(**{**defaults, **OOM_RUN, "output": str(tmp_path / name), **settings})


def _eval_forwards(model):
    """The batch sizes of the model's forwards in eval mode, in order."""
    sizes = []
    model.register_forward_pre_hook(lambda module, args: None if module.training else sizes.append(len(args[0])))
    return sizes


def test_with_batch_size_auto_the_evaluation_batch_is_probed_on_its_own_forward(tmp_path):
    model = _net(batchnorm=False)
    sizes = _eval_forwards(model)
    result = train(
        _config(tmp_path, "auto", batch_size="auto", simulate="mps:16GiB", memory_limit="160MiB"),
        model=model,
        display=QUIET,
    )
    probe, evaluation = result.probe, result.eval_probe
    assert (probe.mode, evaluation.mode) == ("train", "eval")
    assert (result.micro_batch_size, result.eval_batch_size) == (probe.batch_size, evaluation.batch_size) == (27, 43)
    [trial] = [t for t in evaluation.trials if t.batch_size == evaluation.batch_size]
    assert trial.ok and trial.peak_bytes <= evaluation.budget_bytes
    assert sorted(e["event"] for e in result.events) == ["eval_probe", "measured_peak", "probe"]
    assert [row["eval_batch_size"] for row in result.epochs] == [43, 43]
    # The probe's forwards are its trials; every evaluation after it ran in batches of the probed size.
    probed = [t.batch_size for t in evaluation.trials]
    assert sizes[1 : 1 + len(probed)] == probed  # after the warm-up
    assert sizes[1 + len(probed) :] == [43, 43, 42] * 2  # 128 validation images, two epochs


def test_an_oom_while_evaluating_halves_the_evaluation_batch_only(tmp_path):
    # 90 MiB: training at micro-batch 8 fits; evaluating 64 images at once does not, nor 32; 16 does.
    settings = dict(batch_size=8, effective_batch_size=32, eval_batch_size=64)
    limited = train(
        _config(tmp_path, "sim", simulate="mps:16GiB", memory_limit="90MiB", **settings),
        model=_net(batchnorm=False),
        display=QUIET,
    )
    reference = train(_config(tmp_path, "cpu", device="cpu", **settings), model=_net(batchnorm=False), display=QUIET)

    ooms = [
        (e["eval_batch_size"], e["new_eval_batch_size"], e["micro_batch_size"], e["effective_batch_size"])
        for e in limited.events
        if e["event"] == "eval_oom"
    ]
    assert ooms == [(64, 32, 8, 32), (32, 16, 8, 32)]  # once: the second epoch evaluates at 16 from the start
    assert not any(e["event"] == "oom" for e in limited.events)
    rows = [
        (r["eval_batch_size"], r["micro_batch_size"], r["accumulation_steps"], r["effective_batch_size"])
        for r in limited.epochs
    ]
    assert rows == [(16, 8, 4, 32), (16, 8, 4, 32)]
    assert (limited.micro_batch_size, limited.effective_batch_size, limited.eval_batch_size) == (8, 32, 16)
    assert [r["eval_batch_size"] for r in reference.epochs] == [64, 64]
    for ours, theirs in zip(limited.epochs, reference.epochs):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
