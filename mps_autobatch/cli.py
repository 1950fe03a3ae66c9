"""The `autobatch` command: parse, call the library, print. Tables and hints go to stderr; stdout is data."""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from ._units import parse_size
from .devices import MemoryBackend
from .errors import AutobatchError, NoBatchSizeFits
from .results import Trial

__all__ = ["app"]

app = typer.Typer(
    name="autobatch",
    help="Find the largest batch size a PyTorch training step can safely use on MPS, CUDA or CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A timm model name, e.g. efficientnet_b0 or resnet50.")]
ImageSizeOpt = Annotated[int, typer.Option("--image-size", help="Input height and width in pixels.")]
DeviceOpt = Annotated[str, typer.Option("--device", "-d", help="auto (MPS, then CUDA, then CPU), mps, cuda, cuda:N or cpu.")]
SimulateOpt = Annotated[
    str | None,
    typer.Option(
        "--simulate",
        help="Probe a simulated Mac instead of a real device, e.g. mps:16GiB (compute runs on this CPU).",
    ),
]


class _BadInput(Exception):
    """A user mistake found in the CLI itself: reported as one line, exit code 2."""


# Known failures and how they are reported: (exception type, exit code). Anything else keeps its traceback.
_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (_BadInput, 2),
    (NoBatchSizeFits, 1),
    (AutobatchError, 1),
    (ValueError, 2),
    (TypeError, 2),
    (ImportError, 1),
)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _reported() -> Iterator[None]:
    """Turn known exceptions into one `Error: ...` line and an exit code (AUTOBATCH_DEBUG=1 re-raises)."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        for kind, code in _ERRORS:
            if isinstance(exc, kind) and not os.environ.get("AUTOBATCH_DEBUG"):
                _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code)
        raise


def _create_model(name: str, num_classes: int) -> Any:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _BadInput(
            f"Unknown timm model {name!r}.{hint} List names with timm.list_models('{name.split('_')[0]}*')."
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _backend(device: str, simulate: str | None) -> str | MemoryBackend:
    if simulate is None:
        return device
    if device != "auto":
        raise _BadInput(f"--simulate replaces the device; drop --device {device!r} or --simulate.")
    from .simulate import simulated_backend

    return simulated_backend(simulate)


def _progress(enabled: bool) -> tuple[Callable[[Trial], None] | None, Any]:
    if not enabled:
        return None, None
    status = err.status("Probing: warming up...")

    def on_trial(trial: Trial) -> None:
        peak = f"{trial.peak_bytes / 2**30:.2f} GiB" if trial.peak_bytes else "-"
        status.update(f"Probing: batch size {trial.batch_size} -> {trial.outcome}, peak {peak}")

    return on_trial, status


@app.command(epilog="Examples:\n\n  autobatch info\n\n  autobatch info --simulate mps:16GiB")
def info(device: DeviceOpt = "auto", simulate: SimulateOpt = None) -> None:
    """Show the device the probe would use, its memory limit and where that limit comes from."""
    import torch

    from ._units import format_bytes
    from .devices import MPSBackend, get_backend

    with _reported():
        backend = get_backend(_backend(device, simulate))
        limit = backend.limit()
        rows = [("device", backend.name), ("torch", torch.__version__)]
        if isinstance(backend, MPSBackend):
            recommended, source = backend.recommended_max_bytes()
            ratio, ratio_source = backend.watermark_ratio()
            total, available = backend._host_memory()
            rows += [
                ("recommended max", f"{format_bytes(recommended)} ({source})"),
                ("watermark ratio", f"{ratio:.2f} ({ratio_source})"),
                ("unified memory", f"{format_bytes(total)} total, {format_bytes(available)} available"),
            ]
        rows += [("limit", format_bytes(limit.bytes)), ("limit source", limit.source)]
    for name, value in rows:
        typer.echo(f"{name:>16}: {value}")


@app.command(
    epilog=(
        "Examples:\n\n"
        "  autobatch probe\n\n"
        "  autobatch probe --model resnet50 --image-size 224 --requested 32\n\n"
        "  autobatch probe --model test_efficientnet --image-size 64 --device cpu --memory-limit 2GiB\n\n"
        "  autobatch probe --simulate mps:16GiB --json > result.json"
    )
)
def probe(
    model: ModelOpt = "efficientnet_b0",
    image_size: ImageSizeOpt = 224,
    num_classes: Annotated[int, typer.Option(help="Classes of the model's head.")] = 1000,
    device: DeviceOpt = "auto",
    simulate: SimulateOpt = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Hold the probe to this much memory, e.g. 8GiB or 512MB (default: the device's limit).")
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
    as_json: Annotated[bool, typer.Option("--json", help="Print only the result as JSON on stdout.")] = False,
) -> None:
    """Probe real training steps of a timm model and recommend the largest batch size that fits.

    Runs forward, backward and optimizer steps at a few batch sizes, reads the device's memory
    counters against its limit, and prints every trial with the recommended size. The size alone goes
    to stdout (or the whole result with --json), the table to stderr.
    """
    with _reported():
        if image_size < 8:
            raise _BadInput(f"--image-size must be >= 8 pixels, got {image_size}. Pass e.g. --image-size 224.")
        if num_classes < 1:
            raise _BadInput(f"--num-classes must be >= 1, got {num_classes}.")
        limit = parse_size(memory_limit) if memory_limit is not None else None
        backend = _backend(device, simulate)
        net = _create_model(model, num_classes)
        from .probe import find_safe_batch_size

        on_trial, status = _progress(not as_json and err.is_terminal)
        with status if status is not None else nullcontext():
            result = find_safe_batch_size(
                net,
                input_shape=(3, image_size, image_size),
                num_classes=num_classes,
                optimizer=optimizer,
                amp=amp,  # type: ignore[arg-type]
                channels_last=channels_last,
                device=backend,
                memory_limit=limit,
                headroom=headroom,
                requested=requested,
                max_batch_size=max_batch_size,
                multiple_of=multiple_of,
                steps_per_trial=steps_per_trial,
                find_max=find_max,
                on_trial=on_trial,
            )
    if as_json:
        typer.echo(json.dumps({"model": model, "image_size": image_size, **result.to_dict()}, indent=2))
        return
    from .report import summary_lines, trials_table

    err.print(trials_table(result))
    for line in summary_lines(result):
        err.print(line, highlight=False)
    typer.echo(result.batch_size)


def main() -> None:  # pragma: no cover - the console script calls `app`
    app(prog_name="autobatch")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
