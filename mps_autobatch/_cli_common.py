"""What the `autobatch` commands share: the stderr console, option types, error reporting, device
choice, probe progress and warnings. The trainer's commands use it too, so it imports no command.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from .errors import AutobatchError, AutobatchWarning, NoBatchSizeFits, failed_step, first_line

if TYPE_CHECKING:
    from .devices import MemoryBackend
    from .results import Trial

__all__ = ["DeviceOpt", "ImageSizeOpt", "ModelOpt", "SimulateOpt", "err"]

err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A timm model name, e.g. efficientnet_b0 or resnet50.")]
ImageSizeOpt = Annotated[int, typer.Option("--image-size", help="Input height and width in pixels.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", "-d", help="auto (MPS, then CUDA, then CPU), mps, cuda, cuda:N or cpu.")
]
SimulateOpt = Annotated[
    str | None,
    typer.Option(
        "--simulate",
        help="Probe a simulated Mac instead of a real device, e.g. mps:16GiB, or mps:16GiB:pow2-heaps for an "
        "allocator variant (compute runs on this CPU).",
    ),
]


class _BadInput(Exception):
    """A user mistake found in the CLI itself: reported as one line, exit code 2."""


# Known failures and how they are reported: (exception type, exit code). A failure inside a training step is
# reported first (`errors.failed_step`): a ValueError from the user's model is no wrong option. Anything
# else keeps its traceback.
_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (_BadInput, 2),
    (NoBatchSizeFits, 1),
    (AutobatchError, 1),
    (ValueError, 2),
    (TypeError, 2),
    (FileNotFoundError, 2),
    (ImportError, 1),
)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _reported() -> Iterator[None]:
    """Turn known exceptions into one `Error: ...` line and an exit code (AUTOBATCH_DEBUG=1 re-raises)."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        if os.environ.get("AUTOBATCH_DEBUG"):
            raise
        message = first_line(exc)
        where = failed_step(exc)
        if where is not None:
            # The user's model or torch failed inside a training step: not a wrong option, not our bug.
            _fail(
                f"The training step failed {where}: {type(exc).__name__}: {message} "
                "(run with AUTOBATCH_DEBUG=1 to see the traceback).",
                1,
            )
        for kind, code in _ERRORS:
            if isinstance(exc, kind):
                _fail(message, code)
        raise


_NAMES = r"(requested|max_batch_size|multiple_of|steps_per_trial|headroom|num_classes|memory_limit)"
# An argument named as the subject of a check ("requested must ...", "max_batch_size 4 is ...") or of its fix.
_ARGUMENT = re.compile(rf"\b{_NAMES}\b(?= must| \d)|(?<=below ){_NAMES}\b|(?<=Raise ){_NAMES}\b|(?<=lower ){_NAMES}\b")


def _as_flags(message: str) -> str:
    """A library message in the CLI's words: the arguments it names become the flags that set them.

    Example:
        >>> _as_flags("max_batch_size 4 is below multiple_of 8. Raise max_batch_size or lower multiple_of.")
        '--max-batch-size 4 is below --multiple-of 8. Raise --max-batch-size or lower --multiple-of.'
    """
    return _ARGUMENT.sub(lambda match: "--" + match.group(0).replace("_", "-"), message)


@contextmanager
def _flag_names() -> Iterator[None]:
    """Settings checked by the library (`ProbeSpec`), reported with the flags that set them (exit code 2)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise _BadInput(_as_flags(str(exc))) from exc


def _backend(device: str, simulate: str | None) -> str | MemoryBackend:
    if simulate is None:
        from .devices import BACKENDS, available_devices

        kind = device.split(":", 1)[0]
        if kind in BACKENDS and not BACKENDS[kind].is_available():
            found = ", ".join(available_devices())
            raise _BadInput(
                f"--device {device} is not available on this machine (found: {found}). Pass --device auto, or "
                "--simulate mps:16GiB to probe a simulated Mac."
            )
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


@contextmanager
def _warnings_printed() -> Iterator[None]:
    """Our own warnings (a corrupt cache file, say) as one `Warning:` line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutobatchWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, AutobatchWarning):
            err.print(f"[yellow]Warning:[/yellow] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
