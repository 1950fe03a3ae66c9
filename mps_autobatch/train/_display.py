"""What a training run shows a person on stderr: a rich progress bar per epoch, one line per epoch and event."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from ..devices import MemoryBackend
from ..results import ProbeResult

__all__ = ["Display", "memory_bytes"]


def memory_bytes(backend: MemoryBackend) -> int | None:
    """What the run holds on its device now (driver memory on MPS, reserved on CUDA)."""
    return backend.in_use_bytes()


def _gib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**30:.2f} GiB"


class Display:
    """Progress bars (only when stderr is a terminal) and one line per epoch and per event.

    Args:
        console: where everything goes (stderr by default).
        progress: show live bars; None means when the console is a terminal.
        quiet: print nothing at all (the Python API's choice; events are still in metrics.json).
    """

    def __init__(self, console: Console | None = None, *, progress: bool | None = None, quiet: bool = False) -> None:
        self.console = console if console is not None else Console(stderr=True)
        self.quiet = quiet
        show = self.console.is_terminal if progress is None else progress
        self._progress: Progress | None = None
        if show and not quiet:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[speed]} img/s  mem {task.fields[memory]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
        self._task: TaskID | None = None

    def probe(self, result: ProbeResult) -> None:
        """The probe's trials and answer, before training starts."""
        if self.quiet:
            return
        from ..report import summary_lines, trials_table

        if result.cached:
            self.print("Batch size from the probe cache (--no-probe-cache to probe again).")
        self.console.print(trials_table(result))
        for line in summary_lines(result):
            self.print(line)

    def print(self, message: str) -> None:
        """One line for a person (above the bar while one is shown)."""
        if not self.quiet:
            self.console.print(message, highlight=False, soft_wrap=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if self._progress is None:
            return
        self._progress.start()
        description = f"epoch {epoch + 1}/{epochs}"
        self._task = self._progress.add_task(description, total=total, completed=done, loss="-", speed="-", memory="-")

    def step(self, loss: float, images_per_s: float, memory: int | None) -> None:
        if self._progress is None or self._task is None:
            return
        speed, used = f"{images_per_s:.0f}", _gib(memory)
        self._progress.update(self._task, advance=1, loss=f"{loss:.4f}", speed=speed, memory=used)

    def end_epoch(self, row: dict[str, Any], epochs: int, best: bool) -> None:
        self.close()
        mark = "  (best)" if best else ""
        self.print(
            f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"top-1 {100 * row['val_top1']:.2f}%  top-5 {100 * row['val_top5']:.2f}%  "
            f"{row['images_per_s']:.0f} img/s  mem {_gib(row['memory_bytes'])}{mark}"
        )

    def close(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._progress.stop()
            self._task = None
