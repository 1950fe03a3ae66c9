"""``python -m mps_autobatch.train ...``: the seed's command line (``--dataset food-101 --batch-size 24 ...``).

Options alone run `train`; ``evaluate`` and ``predict`` are reached by name, as with ``autobatch``.
"""

from __future__ import annotations

import sys

import typer

from .commands import register

__all__ = ["app", "main"]

app = typer.Typer(
    help="Train, evaluate and predict with the bundled image-classification trainer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
register(app)

_COMMANDS = ("train", "evaluate", "predict", "--help", "-h")


def main(argv: list[str] | None = None) -> None:
    """Run a command; arguments that do not start with a command name go to `train`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in _COMMANDS:
        args = ["train", *args]
    app(args=args, prog_name="python -m mps_autobatch.train")


if __name__ == "__main__":
    main()
