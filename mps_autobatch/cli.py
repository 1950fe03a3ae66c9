"""The `autobatch` command: parse, call the library, print. Tables and hints go to stderr; stdout is data."""

from __future__ import annotations

import functools
import json
from contextlib import nullcontext
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ._cli_advise import register as register_advise
from ._cli_common import (
    DeviceOpt,
    ImageSizeOpt,
    ModelOpt,
    SimulateOpt,
    _backend,
    _BadInput,
    _flag_names,
    _progress,
    _reported,
    _warnings_printed,
    err,
)
from ._cli_explain import register as register_explain
from ._units import parse_size
from .models import check_model_name, create_model
from .spec import ProbeSpec
from .train.commands import register as register_trainer

if TYPE_CHECKING:
    pass

__all__ = ["app"]

app = typer.Typer(
    name="autobatch",
    help="Find the largest batch size a PyTorch training step can safely use on MPS, CUDA or CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command(epilog="Examples:\n\n  autobatch info\n\n  autobatch info --simulate mps:16GiB")
def info(device: DeviceOpt = "auto", simulate: SimulateOpt = None) -> None:
    """Show the device the probe would use, its memory limit and where that limit comes from."""
    import torch

    from ._units import format_bytes
    from .devices import available_devices, get_backend

    with _reported():
        backend = get_backend(_backend(device, simulate))
        limit = backend.limit()
        rows = [("devices found", ", ".join(available_devices())), *backend.describe(), ("torch", torch.__version__)]
        rows += [
            ("in use now", format_bytes(backend.in_use_bytes())),
            ("limit", format_bytes(limit.bytes)),
            ("limit source", limit.source),
        ]
    for name, value in rows:
        typer.echo(f"{name:>16}: {value}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  autobatch probe\n\n"
        "  autobatch probe --model resnet50 --image-size 224 --requested 32 --plot mem.png\n\n"
        "  autobatch probe --model test_efficientnet --image-size 64 --device cpu --memory-limit 2GiB\n\n"
        "  autobatch probe --simulate mps:16GiB --json > result.json"
    )
)
def probe(
    model: ModelOpt = "efficientnet_b0",
    image_size: ImageSizeOpt = 224,
    num_classes: Annotated[int, typer.Option(help="Classes of the model's head.")] = 1000,
    channels: Annotated[int, typer.Option(help="Input channels.")] = 3,
    device: DeviceOpt = "auto",
    simulate: SimulateOpt = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Hold the probe to this much memory, e.g. 8GiB or 512MB (default: the device's).")
    ] = None,
    headroom: Annotated[float, typer.Option(help="Fraction of the limit to keep free.")] = 0.2,
    requested: Annotated[
        int | None, typer.Option(help="The batch size you want: start at 80% of it and plan gradient accumulation.")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Never probe above this size.")] = None,
    multiple_of: Annotated[int, typer.Option(help="Only probe multiples of this.")] = 1,
    optimizer: Annotated[str, typer.Option(help="adamw, adam or sgd.")] = "adamw",
    amp: Annotated[str | None, typer.Option(help="Mixed precision: bf16 or fp16.")] = None,
    channels_last: Annotated[bool, typer.Option(help="Use the channels-last memory format.")] = False,
    steps_per_trial: Annotated[int, typer.Option(help="Training steps per probe.")] = 1,
    find_max: Annotated[bool, typer.Option(help="Also find the exact largest size that runs at all.")] = False,
    evaluation: Annotated[
        bool,
        typer.Option(
            "--eval", help="Size evaluation/inference: the forward alone, in eval and inference mode, no optimizer."
        ),
    ] = False,
    objective: Annotated[
        str, typer.Option(help="memory: the largest size that fits; throughput: the knee of samples/s.")
    ] = "memory",
    plot: Annotated[str | None, typer.Option(help="Write a PNG of peak memory against batch size.")] = None,
    breakdown: Annotated[
        bool,
        typer.Option(
            "--breakdown",
            help="Also show where the memory at the recommended size goes: parameters, gradients, optimizer state, "
            "buffers, activations, allocator overhead.",
        ),
    ] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Probe even if a cached answer exists.")] = False,
    isolate: Annotated[
        bool | None,
        typer.Option(
            "--isolate/--no-isolate",
            help="Probe in a child process, so a Metal abort or a hang marks that size too big instead of killing "
            "this shell (default: on for a real MPS device only).",
        ),
    ] = None,
    trial_timeout: Annotated[
        float, typer.Option(help="With --isolate: seconds a single trial may take before its size counts as too big.")
    ] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result as JSON on stdout.")] = False,
) -> None:
    """Probe real training steps of a timm model and recommend the largest batch size that fits.

    Runs forward, backward and optimizer steps at a few batch sizes, reads the device's memory
    counters against its limit, and prints every trial with the recommended size. The size alone goes
    to stdout (or the whole result with --json), the table to stderr. Answers are cached: the same probe
    on the same machine returns at once (--no-cache to probe again).
    """
    with _reported():
        if image_size < 8:
            raise _BadInput(f"--image-size must be >= 8 pixels, got {image_size}. Pass e.g. --image-size 224.")
        for name, value in (("--num-classes", num_classes), ("--channels", channels)):
            if value < 1:
                raise _BadInput(f"{name} must be >= 1, got {value}.")
        if plot is not None and not plot.lower().endswith(".png"):
            raise _BadInput(f"--plot writes a PNG file; got {plot!r}. Pass e.g. --plot mem.png.")
        if trial_timeout <= 0:
            raise _BadInput(f"--trial-timeout must be positive seconds, got {trial_timeout}.")
        # The settings' own checks, before a device, the cache or a model is touched.
        with _flag_names():
            spec = ProbeSpec(
                input_shape=(channels, image_size, image_size),
                num_classes=num_classes,
                optimizer=optimizer,
                amp=amp,  # type: ignore[arg-type]
                channels_last=channels_last,
                memory_limit=parse_size(memory_limit) if memory_limit is not None else None,
                headroom=headroom,
                requested=requested,
                max_batch_size=max_batch_size,
                multiple_of=multiple_of,
                steps_per_trial=steps_per_trial,
                find_max=find_max,
                objective=objective,  # type: ignore[arg-type]
                mode="eval" if evaluation else "train",
            )
        from .devices import get_backend
        from .probe import find_safe_batch_size

        backend = get_backend(_backend(device, simulate))
        on_trial, status = _progress(not as_json and err.is_terminal)
        with status if status is not None else nullcontext(), _warnings_printed():
            result = find_safe_batch_size(
                model,
                spec=spec,
                device=backend,
                cache=not no_cache,
                # A real Mac can abort the process on some Metal failures (pytorch#84039): isolate there by default.
                isolate=isolate if isolate is not None else backend.aborts_on_failure,
                trial_timeout_s=trial_timeout,
                on_trial=on_trial,
            )
        cached = result.cached
        if plot is not None:
            from .report import plot as draw

            draw(result, plot)
    if as_json:
        typer.echo(json.dumps({"model": model, "image_size": image_size, **result.to_dict()}, indent=2))
        return
    from .report import breakdown_table, summary_lines, trials_table

    if cached:
        err.print("[dim]From the cache (run with --no-cache to probe again).[/dim]")
    err.print(trials_table(result))
    parts = breakdown_table(result) if breakdown else None
    if parts is not None:
        err.print(parts)
    elif breakdown:
        why = "this cached answer has none (--no-cache probes again)" if cached else "the size has no measured peak"
        err.print(f"No breakdown: {why}.", highlight=False, markup=False)
    for line in summary_lines(result):
        err.print(line, highlight=False, markup=False)
    if plot is not None:
        err.print(f"Plot written to {plot}", highlight=False, markup=False)
    typer.echo(result.batch_size)


cache_app = typer.Typer(help="The on-disk cache of probe answers.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached probe answer."""
    from . import cache

    removed = cache.clear()
    err.print(f"Removed {removed} cached answer(s) from {cache.cache_dir()}", highlight=False, markup=False)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  autobatch estimate --image-size 224 --image-size 1024\n\n"
        "  autobatch estimate --model resnet50 --batch-size 16 --batch-size 64 --calibrate"
    )
)
def estimate(
    model: ModelOpt = "efficientnet_b0",
    image_size: Annotated[
        list[int] | None, typer.Option("--image-size", help="Input sizes to predict, repeatable (default 224).")
    ] = None,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", help="Batch sizes to predict, repeatable (default 8, 16, 32).")
    ] = None,
    num_classes: Annotated[int, typer.Option(help="Classes of the model's head.")] = 1000,
    optimizer: Annotated[str, typer.Option(help="adamw, adam or sgd.")] = "adamw",
    amp: Annotated[str | None, typer.Option(help="Mixed precision: bf16 or fp16.")] = None,
    calibrate: Annotated[
        bool,
        typer.Option(
            help="Run two real small steps (the first --batch-size and twice it) on the device and predict its peak: "
            "the dry run with the device's allocator rules replayed, plus what the two steps held beyond it."
        ),
    ] = False,
    device: DeviceOpt = "auto",
    simulate: SimulateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the predictions as JSON on stdout.")] = False,
) -> None:
    """Predict the peak memory of a training step without running it (a dry run on fake tensors).

    Traces forward, backward and the optimizer step under FakeTensorMode and counts tensor memory, for
    every image size and batch size given. Allocator caches and device overheads are not in a dry run:
    --calibrate measures two real steps and predicts the device's peak from them.
    """
    from rich.table import Table

    from ._units import format_bytes

    with _reported():
        sizes = image_size or [224]
        batches = batch_size or [8, 16, 32]
        if min(sizes) < 8:
            raise _BadInput(f"--image-size must be >= 8 pixels, got {min(sizes)}. Pass e.g. --image-size 224.")
        check_model_name(model)
        from .devices import get_backend
        from .estimate import calibrate as calibrate_on
        from .estimate import estimate_grid

        factory = functools.partial(create_model, model, num_classes)
        backend = get_backend(_backend(device, simulate)) if calibrate else None
        estimates = estimate_grid(
            factory,
            input_shapes=[(3, s, s) for s in sizes],
            batch_sizes=batches,
            num_classes=num_classes,
            optimizer=optimizer,
            amp=amp,
            allocator=backend.allocator_rules if backend is not None else None,
        )
        calibration = None
        if backend is not None:
            calibration = calibrate_on(
                factory,
                backend,
                input_shape=estimates[0].input_shape,
                batch_size=estimates[0].batch_size,
                num_classes=num_classes,
                optimizer=optimizer,
                amp=amp,
            )
    calibrated = _calibrated(estimates, calibration) if calibration is not None else {}
    if as_json:
        rows = [
            {
                "image_size": item.input_shape[-1],
                "batch_size": item.batch_size,
                "tensor_bytes": item.peak_bytes,
                "allocator_bytes": item.allocator_bytes,
                "calibrated_bytes": calibrated.get(id(item)),
            }
            for item in estimates
        ]
        typer.echo(json.dumps({"model": model, "optimizer": optimizer, "amp": amp, "estimates": rows}, indent=2))
        return
    table = Table(title=f"Predicted peak memory of one {model} training step ({optimizer})")
    table.add_column("image size", justify="right")
    table.add_column("batch size", justify="right")
    table.add_column("tensors", justify="right")
    replayed = calibration is not None and calibration.allocator is not None
    if replayed:
        table.add_column("+ allocator", justify="right")
    if calibration is not None:
        table.add_column("device peak (calibrated)", justify="right")
        model_text = "tensors with the allocator's rounding and cache" if replayed else "tensors"
        table.caption = (
            f"Calibrated on real steps at {calibration.sizes[0]} and {calibration.sizes[1]}: device peak = "
            f"{model_text} + {format_bytes(calibration.fixed_bytes)} + "
            f"{format_bytes(int(calibration.per_sample_bytes))} per sample (per sample scaled by each input size's "
            "bytes per sample)"
        )
    for item in estimates:
        row = [str(item.input_shape[-1]), str(item.batch_size), format_bytes(item.peak_bytes)]
        if replayed:
            row.append(format_bytes(item.modelled_bytes))
        if calibration is not None:
            row.append(format_bytes(calibrated[id(item)]))
        table.add_row(*row)
    Console().print(table)


def _calibrated(estimates: list[Any], calibration: Any) -> dict[int, int]:
    """Each estimate's calibrated device peak: its overhead per sample scaled by its input size's tensor bytes per
    sample (from the grid's batch sizes; by pixels when only one batch size was asked for)."""
    first = estimates[0].input_shape
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for item in estimates:
        by_shape.setdefault(item.input_shape, []).append(item)
    scales: dict[tuple[int, ...], float] = {}
    for shape, items in by_shape.items():
        low, high = min(items, key=lambda e: e.batch_size), max(items, key=lambda e: e.batch_size)
        if high.batch_size > low.batch_size and calibration.tensor_bytes_per_sample > 0:
            slope = (high.peak_bytes - low.peak_bytes) / (high.batch_size - low.batch_size)
            scales[shape] = slope / calibration.tensor_bytes_per_sample
        else:
            scales[shape] = (shape[-1] * shape[-2]) / (first[-1] * first[-2])
    if len(by_shape[first]) > 1:
        scales = {shape: scale / scales[first] for shape, scale in scales.items()}  # the calibrated shape is 1
    return {id(e): calibration.predict(e, scales[e.input_shape]) for e in estimates}


register_trainer(app)
register_explain(app)
register_advise(app)
