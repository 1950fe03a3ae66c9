"""The `autobatch advise` command: which change buys the largest batch, predicted and, with --verify, measured.

`register(app)` adds it to a typer app. The ranked levers are the data, so they go to stdout (plain lines, or
one JSON document with --json); progress and errors go to stderr.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Annotated

import typer

from . import _cli_common as _cli
from ._units import parse_size
from .models import check_model_name

__all__ = ["register"]

ADVISE_EPILOG = (
    "Examples:\n\n"
    "  autobatch advise --model efficientnet_b0 --image-size 1024 --requested 32\n\n"
    "  autobatch advise --model resnet50 --image-size 512 --simulate mps:16GiB --verify --json"
)


def advise(
    model: _cli.ModelOpt = "efficientnet_b0",
    image_size: _cli.ImageSizeOpt = 224,
    requested: Annotated[
        int | None, typer.Option(help="The batch size you want: each lever's predicted peak is at it.")
    ] = None,
    device: _cli.DeviceOpt = "auto",
    simulate: _cli.SimulateOpt = None,
    memory_limit: Annotated[
        str | None, typer.Option(help="Hold the step to this much memory, e.g. 8GiB (default: the device's).")
    ] = None,
    headroom: Annotated[float, typer.Option(help="Fraction of the limit to keep free.")] = 0.2,
    optimizer: Annotated[str, typer.Option(help="The optimizer the step uses now: adamw, adam or sgd.")] = "adamw",
    num_classes: Annotated[int, typer.Option(help="Classes of the model's head.")] = 1000,
    verify: Annotated[bool, typer.Option("--verify", help="Probe the top three levers for real.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the advice as JSON on stdout.")] = False,
) -> None:
    """Rank what to change so a larger batch fits: input size, bf16/fp16, channels-last, SGD, checkpointing.

    Each lever's largest batch is predicted from a dry run of the step with the lever applied and one
    calibration of the device (two small real steps); --verify probes the top three for real.
    """
    with _cli._reported():
        if image_size < 8:
            raise _cli._BadInput(f"--image-size must be >= 8 pixels, got {image_size}. Pass e.g. --image-size 224.")
        if requested is not None and requested < 1:
            raise _cli._BadInput(f"--requested must be >= 1, got {requested}.")
        if not 0 <= headroom < 1:
            raise _cli._BadInput(f"--headroom must be in [0, 1), got {headroom}. Pass e.g. --headroom 0.2.")
        if optimizer not in ("adamw", "adam", "sgd"):
            raise _cli._BadInput(f"Unknown --optimizer {optimizer!r}. Use adamw, adam or sgd.")
        check_model_name(model)
        from .devices import get_backend
        from .levers import advise as advise_on
        from .levers import describe

        backend = get_backend(_cli._backend(device, simulate))
        status = _cli.err.status("Calibrating and predicting each lever...") if _cli.err.is_terminal else nullcontext()
        with status, _cli._warnings_printed():
            advice = advise_on(
                model,
                image_size=image_size,
                requested=requested,
                device=backend,
                memory_limit=parse_size(memory_limit) if memory_limit is not None else None,
                headroom=headroom,
                optimizer=optimizer,
                num_classes=num_classes,
                verify=verify,
            )
    if as_json:
        typer.echo(json.dumps(advice.to_dict(), indent=2))
        return
    for line in describe(advice):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add ``autobatch advise`` to ``app``."""
    app.command(epilog=ADVISE_EPILOG)(advise)
