"""What the `autobatch` commands share: the stderr console, option types, error reporting, model
names, device choice, and the cached probe. The trainer's commands use it too, so it imports no command.
"""

from __future__ import annotations

import difflib
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from . import distributed
from .devices import MemoryBackend
from .errors import AutobatchError, AutobatchWarning, NoBatchSizeFits
from .results import ProbeResult, Trial

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
        for kind, code in _ERRORS:
            if isinstance(exc, kind) and not os.environ.get("AUTOBATCH_DEBUG"):
                _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code)
        raise


def _suggest_model(name: str, names: list[str]) -> str | None:
    """The model name a typo most likely meant: common slips first (0/o, 1/l, -/_, case), then difflib."""
    slips = name.lower().replace("-", "_")
    for candidate in (slips, slips.replace("o", "0"), slips.replace("l", "1")):
        if candidate in names:
            return candidate
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _check_model(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = _suggest_model(name, timm.list_models())
        hint = f" Did you mean {close!r}?" if close else ""
        raise _BadInput(
            f"Unknown timm model {name!r}.{hint} List names with timm.list_models('{name.split('_')[0]}*')."
        )


def _create_model(name: str, num_classes: int) -> Any:
    import timm

    _check_model(name)
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


def _cache_key(backend: MemoryBackend, settings: dict[str, Any]) -> dict[str, Any]:
    import timm
    import torch

    from . import __version__

    versions = {"torch": torch.__version__, "timm": timm.__version__, "mps_autobatch": __version__}
    return {**settings, "device": backend.identity(), "versions": versions}


def _probe_or_cached(
    model: str,
    backend: MemoryBackend,
    settings: dict[str, Any],
    *,
    use_cache: bool,
    quiet: bool,
    isolate: bool | None,
    trial_timeout_s: float,
) -> tuple[ProbeResult, bool]:
    """Reuse a cached answer when one was found under a limit no larger than today's; else probe and store."""
    from . import cache
    from .probe import find_safe_batch_size

    limit = backend.limit(settings["memory_limit"])
    # The limit is not part of the key: an answer found under a limit no larger than today's still fits,
    # so a default limit that drifts with free memory keeps hitting.
    key = _cache_key(backend, {"model": model, **{k: v for k, v in settings.items() if k != "memory_limit"}})
    if use_cache:
        # Under torchrun rank 0 reads the cache and tells the others, so every rank probes, or none does.
        hit = distributed.rank_zero_decides(functools.partial(_cached, key, limit.bytes))
        if hit is not None:
            return hit, True
    on_trial, status = _progress(not quiet and err.is_terminal)
    with status if status is not None else nullcontext():
        # A real Mac can abort the process on some Metal failures (pytorch#84039): isolate there by default.
        if isolate if isolate is not None else backend.name == "mps":
            from .isolate import find_safe_batch_size_isolated

            factory = functools.partial(_create_model, model, settings["num_classes"])
            result = find_safe_batch_size_isolated(
                factory, trial_timeout_s=trial_timeout_s, device=backend, on_trial=on_trial, **settings
            )
        else:
            net = _create_model(model, settings["num_classes"])
            result = find_safe_batch_size(net, device=backend, on_trial=on_trial, **settings)
    if use_cache and distributed.rank_and_world()[0] == 0:
        cache.store(key, result)
    return result, False


def _cached(key: dict[str, Any], limit_bytes: int) -> ProbeResult | None:
    from . import cache

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutobatchWarning)
        hit = cache.load(key, limit_bytes)
    for warning in caught:
        err.print(f"[yellow]Warning:[/yellow] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
    return hit
