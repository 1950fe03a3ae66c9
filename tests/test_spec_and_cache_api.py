"""ProbeSpec, the cache in the library, errors by kind, and a CLI that does not import what it does not need."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mps_autobatch import ProbeSpec, find_safe_batch_size
from mps_autobatch.cli import app
from mps_autobatch.probe import module_fingerprint
from mps_autobatch.simulate import simulated_backend

runner = CliRunner()
SIM = "mps:16GiB"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


# --- ProbeSpec ----------------------------------------------------------------------------------------------


def test_the_spec_is_frozen_keyword_only_and_checked():
    spec = ProbeSpec(model="resnet18", input_shape=[3, 224, 224], requested=32)
    assert spec.input_shape == (3, 224, 224)  # a list becomes the tuple the cache key holds
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.headroom = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        ProbeSpec("resnet18")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("settings", "kind", "message"),
    [
        ({"input_shape": 3072}, TypeError, "input_shape must be one sample's shape as a tuple, got 3072. "
         "Pass e.g. input_shape=(3, 224, 224) or input_shape=(3072,) for a vector."),
        ({"input_shape": (3, 0)}, ValueError, "input_shape must be the positive sizes of one sample, got (3, 0)."),
        ({"optimizer": "lion"}, ValueError, "Unknown optimizer 'lion'. Use one of: adamw, adam, sgd, or pass an "
         "optimizer."),
        ({"headroom": 1.5}, ValueError, "headroom must be a fraction in [0, 1), got 1.5."),
        ({"requested": 2.5}, TypeError, "requested must be an int, got 2.5."),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_naming_the_argument(settings, kind, message):
    with pytest.raises(kind) as raised:
        ProbeSpec(**settings)
    assert str(raised.value).startswith(message)


def test_spec_and_keywords_together_are_refused():
    with pytest.raises(TypeError) as raised:
        find_safe_batch_size(_net(), spec=ProbeSpec(input_shape=(3, 16, 16)), headroom=0.1, device="cpu")
    assert str(raised.value) == (
        "Pass the probe's settings either as spec= or as keyword arguments, not both: headroom given as keywords "
        "too. Put them in the spec."
    )


def test_an_optimizer_object_names_the_spec_s_optimizer_in_the_cache(tmp_path):
    spec = ProbeSpec(input_shape=(3, 16, 16), num_classes=10, memory_limit=96 * 2**20)
    adamw = find_safe_batch_size(_net(), spec=spec, device=simulated_backend(SIM), cache=tmp_path)
    net = _net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with_sgd = find_safe_batch_size(net, spec=spec, optimizer=sgd, device=simulated_backend(SIM), cache=tmp_path)
    assert (adamw.cached, with_sgd.cached) == (False, False)  # SGD's answer is not AdamW's
    keys = sorted(json.loads(path.read_text())["key"]["optimizer"] for path in tmp_path.glob("*.json"))
    assert keys == ["adamw", "custom:SGD"]


def test_what_the_key_cannot_name_needs_a_cache_key():
    with pytest.raises(ValueError, match=r"^cache needs cache_key='...' with a loss_fn: its code is not part"):
        find_safe_batch_size(_net(), input_shape=(3, 16, 16), loss_fn=lambda o, t: o.sum(), device="cpu", cache=True)
    with pytest.raises(ValueError, match=r"^cache needs cache_key='...' with an optimizer factory"):
        factory = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
        find_safe_batch_size(_net(), input_shape=(3, 16, 16), optimizer=factory, device="cpu", cache=True)


def test_a_timm_name_needs_its_input_shape_before_anything_is_built():
    with pytest.raises(ValueError) as raised:
        find_safe_batch_size("test_efficientnet", device="cpu")
    assert str(raised.value) == "input_shape is needed to probe 'test_efficientnet', e.g. input_shape=(3, 224, 224)."


def test_a_spec_gives_the_same_answer_as_its_keywords():
    backend_a, backend_b = simulated_backend(SIM), simulated_backend(SIM)
    options = dict(input_shape=(3, 16, 16), num_classes=10, memory_limit="96MiB")
    keywords = find_safe_batch_size(_net(), device=backend_a, **options)
    spec = ProbeSpec(input_shape=(3, 16, 16), num_classes=10, memory_limit=96 * 2**20)
    specified = find_safe_batch_size(_net(), spec=spec, device=backend_b)
    assert specified.batch_size == keywords.batch_size
    assert [t.batch_size for t in specified.trials] == [t.batch_size for t in keywords.trials]


# --- the cache in the library ----------------------------------------------------------------------------------


def test_a_module_is_cached_by_its_architecture(tmp_path):
    options = dict(input_shape=(3, 16, 16), num_classes=10, memory_limit="96MiB", cache=tmp_path)
    first = find_safe_batch_size(_net(), device=simulated_backend(SIM), **options)
    again = find_safe_batch_size(_net(), device=simulated_backend(SIM), **options)  # other weights, same layers
    assert (first.cached, again.cached) == (False, True)
    assert dataclasses.replace(again, cached=False) == first
    [path] = tmp_path.glob("*.json")
    key = json.loads(path.read_text())["key"]
    assert key["model"] == f"Sequential:{module_fingerprint(_net())}" and key["input_shape"] == [3, 16, 16]
    # A wider layer is another architecture; an answer found under a larger limit than today's is a miss.
    wider = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 128), nn.ReLU(), nn.Linear(128, 10))
    assert find_safe_batch_size(wider, device=simulated_backend(SIM), **options).cached is False
    smaller = {**options, "memory_limit": "90MiB"}
    assert find_safe_batch_size(_net(), device=simulated_backend(SIM), **smaller).cached is False


def test_a_step_function_needs_a_cache_key():
    with pytest.raises(ValueError) as raised:
        find_safe_batch_size(lambda batch_size: None, device="cpu", cache=True)
    assert str(raised.value) == (
        "cache needs cache_key='...' for a step function: a name for what it trains, e.g. "
        "cache_key='my-bert-seq512'. Pass one, or leave the cache off."
    )


def test_a_step_function_with_a_cache_key_is_cached(tmp_path):
    model, calls = _net(), []

    def step(batch_size):
        calls.append(batch_size)
        nn.functional.cross_entropy(
            model(torch.randn(batch_size, 3, 16, 16)), torch.randint(10, (batch_size,))
        ).backward()
        model.zero_grad(set_to_none=True)

    options = dict(device=simulated_backend(SIM), memory_limit="96MiB", cache=tmp_path, cache_key="mlp-16px")
    first = find_safe_batch_size(step, **options)
    ran = len(calls)
    again = find_safe_batch_size(step, **options)
    assert again.cached and again.batch_size == first.batch_size and len(calls) == ran  # no step ran


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_a_cli_cache_hit_imports_no_timm_and_help_imports_no_torch(tmp_path, monkeypatch):
    import os

    env = {**os.environ, "AUTOBATCH_CACHE_DIR": str(tmp_path), "NO_ALBUMENTATIONS_UPDATE": "1"}
    args = [
        "probe",
        "--model",
        "test_efficientnet",
        "--image-size",
        "32",
        "--simulate",
        SIM,
        "--memory-limit",
        "128MiB",
    ]
    probe = (
        "import sys\nfrom mps_autobatch.cli import app\n"
        f"try:\n    app({[*args, '--json']!r}, standalone_mode=False)\n"
        "finally:\n    print('timm' in sys.modules, file=sys.stderr)\n"
    )
    first, hit = _python(probe, env), _python(probe, env)
    assert first.stderr.strip().endswith("True") and not json.loads(first.stdout)["cached"]
    assert hit.stderr.strip() == "False", hit.stderr[-500:]
    assert json.loads(hit.stdout)["cached"] is True
    assert json.loads(hit.stdout)["batch_size"] == json.loads(first.stdout)["batch_size"]
    helps = (
        "import sys\nfrom mps_autobatch.cli import app\n"
        "for args in (['--help'], ['probe', '--help']):\n"
        "    try:\n        app(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules), file=sys.stderr)\n"
    )
    shown = _python(helps, env)
    assert "Find the largest batch size" in shown.stdout and shown.stderr.strip() == "[]"


# --- errors by kind, through the CLI ---------------------------------------------------------------------------


def test_a_failure_inside_the_step_is_one_line_and_exit_1(monkeypatch):
    monkeypatch.delenv("AUTOBATCH_DEBUG", raising=False)
    # At 32 px test_efficientnet ends in a 1x1 map: BatchNorm cannot train on one sample of it.
    args = ["probe", "--model", "test_efficientnet", "--image-size", "32", "--max-batch-size", "1", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--no-cache"])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: The training step failed at batch size 1 (the warm-up): ValueError: Expected more than 1 value per "
        "channel when training, got input size torch.Size([1, 192, 1, 1]) (run with AUTOBATCH_DEBUG=1 to see the "
        "traceback).\n"
    )


def test_a_wrong_option_is_one_line_and_exit_2():
    result = runner.invoke(app, ["probe", "--requested", "0"])
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: --requested must be >= 1, got 0. Pass the batch size you want, or leave it out to search from small.\n"
    )


def test_info_describes_a_simulated_mac_larger_than_this_machine():
    result = runner.invoke(app, ["info", "--simulate", "mps:64GiB"])
    assert result.exit_code == 0, result.stderr
    rows = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines())
    assert rows["device"] == "sim-mps" and rows["recommended max"].startswith("48.00 GiB")
    assert rows["unified memory"].startswith("64.00 GiB total")


def test_an_unavailable_device_names_the_flag_in_the_cli():
    result = runner.invoke(app, ["info", "--device", "mps"])
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: --device mps is not available on this machine (found: cpu). Pass --device auto, or --simulate "
        "mps:16GiB to probe a simulated Mac.\n"
    )


def test_when_two_samples_do_not_fit_a_batchnorm_model_s_failure_at_one_is_not_blamed_on_it():
    args = ["probe", "--model", "test_efficientnet", "--image-size", "32", "--simulate", SIM, "--memory-limit", "70MiB"]
    result = runner.invoke(app, [*args, "--no-cache"])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: No batch size fits in 70.00 MiB: the warm-up step at batch size 2 ran out of memory (MPS backend out "
        "of memory (MPS allocated: "
    )
    assert "; at 1: ValueError: Expected more than 1 value per channel when training" in result.stderr
