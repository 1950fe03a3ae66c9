"""`advise` / `autobatch advise`: the levers ranked by predicted batch, each prediction checked by a real probe."""

import json

import pytest
from typer.testing import CliRunner

from mps_autobatch import advise
from mps_autobatch.cli import app
from mps_autobatch.levers import _levers, _probe, _Setup, describe
from mps_autobatch.simulate import simulated_backend

MiB = 2**20
# A small timm model above its own input size (160 px), under a limit that keeps every probe small.
MODEL, IMAGE, LIMIT = "test_efficientnet", 256, 384 * MiB


@pytest.fixture(scope="module")
def advice():
    return advise(
        MODEL, image_size=IMAGE, device=simulated_backend("mps:16GiB"), memory_limit=LIMIT, num_classes=10, verify=True
    )


def test_the_model_s_own_input_size_ranks_first_and_the_levers_are_ordered_by_predicted_batch(advice):
    names = [lever.lever for lever in advice.levers]
    assert names[0] == "image_size" and advice.levers[0].change == "--image-size 160"
    assert sorted(names) == ["amp_bf16", "channels_last", "grad_checkpointing", "image_size", "sgd"]
    sizes = [lever.batch_size for lever in advice.levers]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > advice.given.batch_size
    # MPS refuses fp16 autocast (its GradScaler has had bugs): left out, with the device's reason.
    assert dict(advice.left_out) == {"amp_fp16": "amp 'fp16' needs a GradScaler, which has had bugs on MPS"}


def test_every_lever_s_prediction_is_near_a_real_probe(advice):
    """Verify probed the top three; the rest (and the step as given) are probed here."""
    backend = simulated_backend("mps:16GiB")
    setups = {
        "as_given": _Setup(IMAGE),
        "image_size": _Setup(160),
        "amp_bf16": _Setup(IMAGE, amp="bf16"),
        "channels_last": _Setup(IMAGE, channels_last=True),
        "sgd": _Setup(IMAGE, optimizer="sgd"),
        "grad_checkpointing": _Setup(IMAGE, grad_checkpointing=True),
    }
    assert [lever.measured_batch_size is not None for lever in advice.levers] == [True, True, True, False, False]
    for lever in (advice.given, *advice.levers):
        measured = lever.measured_batch_size or _probe(MODEL, 10, setups[lever.lever], backend, LIMIT, 0.2)
        assert abs(lever.batch_size - measured) <= 0.15 * measured, (lever.lever, lever.batch_size, measured)


def test_the_json_has_every_lever_best_first_and_the_verified_measurements(advice):
    data = json.loads(json.dumps(advice.to_dict()))
    levers = data["levers"]
    assert levers[0]["lever"] == "image_size"
    assert [row["batch_size"] for row in levers] == sorted((row["batch_size"] for row in levers), reverse=True)
    assert [row["measured_batch_size"] is not None for row in levers] == [True, True, True, False, False]
    assert all(row["peak_bytes"] > 0 for row in levers)
    assert [row["lever"] for row in data["left_out"]] == ["amp_fp16"]
    assert data["budget_bytes"] == int(LIMIT * 0.8) and data["calibration"]["sizes"] == list(advice.calibration.sizes)


def test_the_command_passes_its_options_and_prints_the_advice_as_json_or_lines(advice, monkeypatch):
    # The computation is the fixture's (tested above); here the command's wiring: options in, advice out.
    import mps_autobatch.levers as levers

    calls = []

    def recorded(model, **options):
        calls.append((model, options))
        return advice

    monkeypatch.setattr(levers, "advise", recorded)
    args = ["advise", "--model", MODEL, "--image-size", str(IMAGE), "--num-classes", "10", "--simulate",
            "mps:16GiB", "--memory-limit", "384MiB", "--requested", "64", "--verify"]  # fmt: skip
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == json.loads(json.dumps(advice.to_dict()))
    model, options = calls[0]
    assert model == MODEL and options["device"].name == "sim-mps"
    assert {k: options[k] for k in ("image_size", "requested", "memory_limit", "headroom", "verify")} == {
        "image_size": IMAGE, "requested": 64, "memory_limit": LIMIT, "headroom": 0.2, "verify": True,
    }  # fmt: skip
    text = CliRunner().invoke(app, args)
    assert text.stdout.splitlines() == describe(advice)


def test_the_text_ranks_the_levers_and_says_what_was_left_out_and_why(advice):
    lines = describe(advice)
    assert (
        lines[0]
        == f"As given (test_efficientnet @ 256 px, adamw): batch {advice.given.batch_size} within 307.20 MiB on sim-mps"
    )
    top = advice.levers[0]
    assert lines[1].startswith(f"1. image_size (--image-size 160): batch {top.batch_size} (")
    assert lines[1].endswith(f"; measured {top.measured_batch_size}")
    assert lines[-1] == "Left out: amp_fp16: amp 'fp16' needs a GradScaler, which has had bugs on MPS."
    _, left_out = _levers(MODEL, _Setup(128), simulated_backend("mps:16GiB"))
    assert ("image_size", "128 px is already at or under test_efficientnet's own 160 px") in left_out
    _, left_out = _levers(MODEL, _Setup(128, optimizer="sgd"), simulated_backend("mps:16GiB"))
    assert ("sgd", "the optimizer is already sgd") in left_out


def test_bad_input_is_one_line_and_exit_2():
    runner = CliRunner()
    for args, message in [
        (["--requested", "0"], "--requested must be >= 1, got 0."),
        (["--image-size", "4"], "--image-size must be >= 8 pixels, got 4. Pass e.g. --image-size 224."),
        (["--optimizer", "lamb"], "Unknown --optimizer 'lamb'. Use adamw, adam or sgd."),
    ]:
        bad = runner.invoke(app, ["advise", *args])
        assert bad.exit_code == 2 and bad.output.strip() == f"Error: {message}", bad.output


class _Staircase:
    """A dry run whose model climbs in stairs: 10 bytes a sample of tensors, and 400 more every 7 samples."""

    def __init__(self) -> None:
        self.traced: list[int] = []

    def at(self, setup, sizes):
        from mps_autobatch.estimate import Estimate

        self.traced += sorted(set(sizes) - set(self.traced))
        return {b: Estimate(b, (3, 8, 8), 1000 + 10 * b, allocator_bytes=1000 + 10 * b + 400 * (b // 7)) for b in sizes}


@pytest.mark.parametrize("budget", [1100, 1500, 3000, 9000, 40_000, 400_000])
def test_the_largest_batch_is_found_on_the_stairs_not_on_a_line(budget):
    from mps_autobatch.allocator import MPS_ALLOCATOR
    from mps_autobatch.estimate import Calibration
    from mps_autobatch.levers import _predict

    calibration = Calibration(50, 0.0, (4, 8), (0, 0), (0, 0), (1040, 1080), allocator=MPS_ALLOCATOR)
    stairs = _Staircase()
    best, peak = _predict(stairs, _Setup(8), calibration, budget, requested=None)
    fits = [b for b in range(1, 100_000) if 50 + 1000 + 10 * b + 400 * (b // 7) <= budget]
    assert best == max(fits, default=0)
    assert peak == 50 + 1000 + 10 * max(best, 1) + 400 * (max(best, 1) // 7)
    assert len(stairs.traced) <= 18, stairs.traced  # 1 and 2, at most eight pairs, and the size reported


def test_not_even_one_sample_reports_the_peak_at_one_and_a_requested_size_is_traced():
    from mps_autobatch.allocator import MPS_ALLOCATOR
    from mps_autobatch.estimate import Calibration
    from mps_autobatch.levers import _predict

    calibration = Calibration(50, 0.0, (4, 8), (0, 0), (0, 0), (1040, 1080), allocator=MPS_ALLOCATOR)
    assert _predict(_Staircase(), _Setup(8), calibration, 1000, requested=None) == (0, 1060)
    assert _predict(_Staircase(), _Setup(8), calibration, 3000, requested=64) == (34, 1050 + 640 + 400 * 9)


def test_a_requested_batch_below_one_is_refused():
    with pytest.raises(ValueError) as error:
        advise(MODEL, image_size=IMAGE, requested=0, device=simulated_backend("mps:16GiB"), memory_limit=LIMIT)
    assert str(error.value) == "requested must be >= 1, got 0. Pass the batch you want, or None."
