"""The `autobatch explain` command: read an out-of-memory message, print what ran out and what to do.

`register(app)` adds it to a typer app. Here the explanation is the data, so it goes to stdout (plain text,
or one JSON document with --json); a text that is not an out-of-memory error is one `Error:` line on stderr.
Parsing is pure text (`explain.py`): the command itself needs neither torch nor timm.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Annotated

import typer

from . import _cli_common as _cli
from ._units import format_bytes
from .explain import OOMExplanation, explain_oom

__all__ = ["register"]

EXPLAIN_EPILOG = (
    "Examples:\n\n"
    '  autobatch explain "MPS backend out of memory (MPS allocated: 45.59 GiB, other allocations: 1.02 GiB, '
    'max allowed: 47.74 GiB). Tried to allocate 1.25 GiB on private pool."\n\n'
    "  python train.py 2>&1 | autobatch explain -\n\n"
    "  autobatch explain --json - < crash.log"
)

_TITLES = {
    "mps": "MPS backend out of memory",
    "cuda": "CUDA out of memory",
    "cpu": "CPU out of memory (DefaultCPUAllocator)",
    "buffer": "Metal buffer too large (Invalid buffer size)",
}
_WIDTH = 100


def _read(text: str | None) -> str:
    """The text to explain: the argument, or stdin for ``-`` (or no argument with stdin piped)."""
    if text is not None and text != "-":
        return text
    if text is None and sys.stdin.isatty():
        raise _cli._BadInput(
            "Nothing to explain. Pass the error text as an argument, or - to read it from stdin "
            "(autobatch explain - < crash.log)."
        )
    source = sys.stdin.read()
    if not source.strip():
        raise _cli._BadInput(
            "Nothing to explain: stdin was empty. Pipe the log in: python train.py 2>&1 | autobatch explain -"
        )
    return source


def _rows(exp: OOMExplanation) -> list[tuple[str, int | None, str]]:
    if exp.kind == "mps":
        other = "the allocator's cache, MPSGraph and driver memory (other allocations)"
    elif exp.limit_source == "allowed":
        other = "reserved by PyTorch but unallocated (its cache)"
    else:
        other = "in use besides PyTorch's tensors: its cache, the CUDA context, other processes"
    return [
        ("allocated", exp.allocated_bytes, "PyTorch's tensors"),
        ("other", exp.other_bytes, other),
        ("request", exp.tried_bytes, "the allocation that failed" + (f", {exp.pool} pool" if exp.pool else "")),
        ("free", exp.free_bytes, "what the driver reported free"),
        ("limit", exp.limit_bytes, exp.limit_source or ""),
        ("over by", exp.over_by_bytes, "allocated + other + request - limit"),
    ]


def _wrapped(text: str, first: str, rest: str) -> str:
    # Keep "45.59 GiB" on one line: wrap with the number and its unit glued together.
    glued = text.replace(" GiB", "\xa0GiB").replace(" MiB", "\xa0MiB").replace(" KiB", "\xa0KiB")
    lines = textwrap.wrap(glued, _WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)
    return "\n".join(lines).replace("\xa0", " ")


def render(exp: OOMExplanation) -> str:
    """The explanation as text: the sizes, the causes, then the numbered next steps.

    Example:
        >>> exp = explain_oom("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
        ...     "you tried to allocate 1073741824 bytes.")
        >>> print(render(exp).splitlines()[1])
          request     1.00 GiB  the allocation that failed
    """
    lines = [_TITLES[exp.kind]]
    for name, size, meaning in _rows(exp):
        if size is not None:
            lines.append(f"  {name:<9} {format_bytes(size):>10}  {meaning}")
    lines += ["", "Why:"]
    lines += [_wrapped(cause, "  - ", "    ") for cause in exp.causes]
    lines += ["", "Next steps, most useful first:"]
    lines += [_wrapped(fix, f"  {number}. ", "     ") for number, fix in enumerate(exp.fixes, 1)]
    return "\n".join(lines)


def explain_command(
    text: Annotated[
        str | None,
        typer.Argument(
            help="The error text, a traceback or a log holding it; - (or nothing, with a pipe) reads stdin.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only the explanation as JSON on stdout.")] = False,
) -> None:
    """Explain an out-of-memory error from MPS, CUDA or CPU with the numbers it prints, and what to do next.

    Reads the MPS, CUDA, cuBLAS/cuDNN, Metal buffer and CPU allocator messages, from the text itself or from
    a traceback or log pasted whole: what was allocated, what else held memory, where the limit comes from,
    the failed request and how far over it went, then the next steps in order.
    """
    with _cli._reported():
        source = _read(text)
        try:
            explanation = explain_oom(source)
        except ValueError as exc:
            raise _cli._BadInput(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(explanation.to_dict(), indent=2))
        return
    typer.echo(render(explanation))


def register(app: typer.Typer) -> None:
    """Add the `explain` command to ``app``.

    Example:
        >>> app = typer.Typer()
        >>> register(app)
        >>> [command.name for command in app.registered_commands]
        ['explain']
    """
    app.command("explain", epilog=EXPLAIN_EPILOG)(explain_command)
