"""The `autobatch train`, `evaluate` and `predict` commands and what a run shows a person (`Display`).

`register(app)` adds them to a typer app (cli.py's, or the one ``python -m mps_autobatch.train`` builds).
Tables, progress and hints go to stderr; stdout carries data only (the run folder, or JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from .. import _cli_common as _cli

if TYPE_CHECKING:  # `autobatch --help` imports this module: no torch at import time
    from ..devices import MemoryBackend
    from ..results import ProbeResult

__all__ = [
    "Display",
    "memory_bytes",
    "register",
]

# DataLoader warns, and slows down, with more workers than cores.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the result as JSON on stdout.")]
CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", help="A run's last.pt or best.pt.")]

TRAIN_EPILOG = (
    "Examples:\n\n"
    "  autobatch train --dataset synthetic --model test_efficientnet --image-size 64 --epochs 1\n\n"
    "  autobatch train --dataset food-101 --data-dir ~/data --download --batch-size auto --epochs 50\n\n"
    "  autobatch train --dataset food-101 --data-dir ~/data --dev-mode --dev-samples 500 --device mps\n\n"
    "  autobatch train --dataset imagefolder:~/pets --effective-batch-size 64 --resume"
)


@contextmanager
def _reported_train() -> Iterator[None]:
    """cli.py's error mapping, plus a missing dataset or file as bad input (one line, exit code 2)."""
    with _cli._reported():
        try:
            yield
        except FileNotFoundError as exc:
            raise _cli._BadInput(str(exc)) from exc


def _check_device_and_limit(config: Any) -> None:
    """The device, its memory limit and the MPS watermark setting, checked before any data or model is loaded.

    On CPU and CUDA the trainer reads ``--memory-limit`` only when it probes, so a limit larger than the
    machine would go unnoticed with a fixed --batch-size; elsewhere it would be found after the model is built.
    """
    from .._units import parse_size
    from ..devices import get_backend
    from ._setup import resolve_device

    backend = get_backend(resolve_device(config))
    backend.limit(parse_size(config.memory_limit) if config.memory_limit is not None else None)


def _batch_size(text: str, flag: str = "--batch-size") -> int | Literal["auto"]:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise _cli._BadInput(f"{flag} must be a positive integer or auto, got {text!r}.") from None


def train_command(
    dataset: Annotated[str, typer.Option(help="food-101, imagefolder:PATH or synthetic.")] = "food-101",
    data_dir: Annotated[str, typer.Option(help="The folder holding food-101/ (or to download it to).")] = "data",
    download: Annotated[bool, typer.Option(help="Download Food-101 into --data-dir when it is missing.")] = False,
    model: _cli.ModelOpt = "efficientnet_b0",
    image_size: _cli.ImageSizeOpt = 224,
    pretrained: Annotated[
        bool | None,
        typer.Option(
            "--pretrained/--no-pretrained", help="Start from pretrained weights (default: on, off for synthetic)."
        ),
    ] = None,
    weights: Annotated[str | None, typer.Option(help="A local pretrained weights file for the model.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 50,
    batch_size: Annotated[
        str, typer.Option(help="Micro-batch size, or auto to probe for the largest that fits.")
    ] = "auto",
    effective_batch_size: Annotated[
        int | None, typer.Option(help="Samples per optimizer update, kept with gradient accumulation.")
    ] = None,
    eval_batch_size: Annotated[
        str | None,
        typer.Option(
            help="Images per evaluation batch, or auto to probe the evaluation forward (default: auto with "
            "--batch-size auto, else the micro-batch)."
        ),
    ] = None,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-3 AdamW, 0.05 SGD).")] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay (not on biases and norms).")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warmup before the cosine decay, in epochs.")] = 1.0,
    amp: Annotated[str, typer.Option(help="auto, off, bf16 or fp16 (auto: where the device supports it).")] = "auto",
    device: _cli.DeviceOpt = "auto",
    simulate: _cli.SimulateOpt = None,
    memory_limit: Annotated[str | None, typer.Option(help="Hold probing and training to this much memory.")] = None,
    empty_cache_every: Annotated[
        int | None, typer.Option(help="Release the allocator's cache every K updates (default 10 on MPS, else 0).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds weights, data order and augmentation.")] = 0,
    workers: Annotated[
        int, typer.Option(help="Data-loading processes (default: 4, or fewer on fewer cores).")
    ] = DEFAULT_WORKERS,
    dev_mode: Annotated[bool, typer.Option(help="Train on a small stratified subset (--dev-samples).")] = False,
    dev_samples: Annotated[int | None, typer.Option(help="Training images in --dev-mode (default 500).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the training split held out for validation.")] = 0.1,
    output: Annotated[str | None, typer.Option(help="The run folder (default runs/<dataset>-<model>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its last.pt.")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Also write last.pt every K updates (0: epoch ends).")] = 0,
    stop_after: Annotated[int | None, typer.Option(help="Stop after N updates, saving last.pt for --resume.")] = None,
    sync_bn: Annotated[
        bool, typer.Option("--sync-bn", help="Under torchrun on CUDA: BatchNorm statistics over all ranks.")
    ] = False,
    no_probe_cache: Annotated[
        bool, typer.Option("--no-probe-cache", help="Probe even if a cached answer exists.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a timm model on an image dataset with a batch size that fits the device.

    Evaluates top-1/top-5 on the validation split each epoch and writes metrics.csv, metrics.json,
    last.pt and best.pt to the run folder. An out-of-memory error mid-run halves the micro-batch and keeps
    the effective batch with gradient accumulation.
    """
    from ..models import check_model_name
    from .config import TrainConfig
    from .engine import train

    with _reported_train():
        check_model_name(model)
        config = TrainConfig(
            dataset=dataset,
            data_dir=data_dir,
            model=model,
            image_size=image_size,
            pretrained=pretrained,
            weights=weights,
            epochs=epochs,
            batch_size=_batch_size(batch_size),
            effective_batch_size=effective_batch_size,
            eval_batch_size=_batch_size(eval_batch_size, "--eval-batch-size") if eval_batch_size is not None else None,
            optimizer=optimizer,  # type: ignore[arg-type]
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            amp=amp,  # type: ignore[arg-type]
            device=device,
            simulate=simulate,
            memory_limit=memory_limit,
            empty_cache_every=empty_cache_every,
            seed=seed,
            workers=workers,
            dev_samples=dev_samples if dev_samples is not None else (500 if dev_mode else None),
            val_fraction=val_fraction,
            download=download,
            output=output,
            resume=resume,
            checkpoint_every=checkpoint_every,
            stop_after=stop_after,
            sync_bn=sync_bn,
            probe_cache=not no_probe_cache,
        )
        _check_device_and_limit(config)
        try:
            result = train(config, display=Display(_cli.err))
        except KeyboardInterrupt as exc:
            _interrupted(exc)
    _report_training(result, as_json)


def _interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C: one line saying what was saved (`TrainingInterrupted`'s message), exit code 130 as for SIGINT."""
    from .checkpoint import TrainingInterrupted

    unsaved = "Interrupted before training started: nothing saved."
    message = str(exc) if isinstance(exc, TrainingInterrupted) else unsaved
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 saved, and speaks for every rank
        _cli.err.print(message, highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(130)


def _report_training(result: Any, as_json: bool) -> None:
    if result.best_top1 is not None:
        best = max(result.epochs, key=lambda row: row["val_top1"])
        _cli.err.print(f"Best val top-1 {100 * best['val_top1']:.2f}% (epoch {best['epoch']}).", highlight=False)
    if result.stopped:
        _cli.err.print(f"Stopped after update {result.updates}; continue with --resume.", highlight=False)
    _cli.err.print(f"Metrics and checkpoints in {result.output_dir}", highlight=False)
    if as_json:
        data = {**dataclasses.asdict(result), "output_dir": str(result.output_dir)}
        typer.echo(json.dumps(data, indent=2))
    else:
        typer.echo(str(result.output_dir))


def evaluate_command(
    checkpoint: CheckpointOpt,
    split: Annotated[str | None, typer.Option(help="val or test (default: test where the dataset has one).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Where the dataset is now, if it moved.")] = None,
    device: _cli.DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per evaluation batch.")] = 64,
    workers: Annotated[
        int, typer.Option(help="Data-loading processes (default: 4, or fewer on fewer cores).")
    ] = DEFAULT_WORKERS,
) -> None:
    """Top-1 and top-5 accuracy of a checkpoint on its run's validation or test split (JSON on stdout)."""
    from .inference import evaluate_checkpoint

    with _reported_train():
        if workers < 0:
            raise _cli._BadInput(f"--workers must be >= 0, got {workers}.")
        metrics = evaluate_checkpoint(
            checkpoint, split=split, data_dir=data_dir, device=device, batch_size=batch_size, workers=workers
        )
    _cli.err.print(
        f"{metrics['split']}: top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  "
        f"loss {metrics['loss']:.4f} on {metrics['images']} images",
        highlight=False,
    )
    typer.echo(json.dumps(metrics, indent=2))


def predict_command(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.")],
    checkpoint: CheckpointOpt,
    device: _cli.DeviceOpt = "auto",
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """The most likely classes of each image, with probabilities, from a trained checkpoint."""
    from .inference import predict

    with _reported_train():
        predictions = predict(checkpoint, images, device=device, top_k=top_k)
    if as_json:
        typer.echo(json.dumps(predictions, indent=2))
        return
    for item in predictions:
        ranked = ", ".join(f"{entry['class']} {100 * entry['probability']:.1f}%" for entry in item["top"])
        typer.echo(f"{item['image']}: {ranked}")


def register(app: typer.Typer) -> None:
    """Add the `train`, `evaluate` and `predict` commands to ``app``.

    Example:
        >>> app = typer.Typer()
        >>> register(app)
        >>> sorted(command.name for command in app.registered_commands)
        ['evaluate', 'predict', 'train']
    """
    app.command("train", epilog=TRAIN_EPILOG)(train_command)
    app.command(
        "evaluate",
        epilog="Examples:\n\n  autobatch evaluate --checkpoint runs/food-101-efficientnet_b0/best.pt --split test",
    )(evaluate_command)
    app.command(
        "predict",
        epilog="Examples:\n\n  autobatch predict --checkpoint runs/food-101-efficientnet_b0/best.pt pizza.jpg ramen.jpg"
        "\n\n  autobatch predict --checkpoint runs/digits-resnet18/last.pt --top-k 3 --json digit.png",
    )(predict_command)


# --- what a run shows a person -------------------------------------------------------------------------------
# What a training run shows a person on stderr: a rich progress bar per epoch, one line per epoch and event.


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
            what = "Evaluation batch size" if result.mode == "eval" else "Batch size"
            self.print(f"{what} from the probe cache (--no-probe-cache to probe again).")
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
