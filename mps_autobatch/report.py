"""Show a `ProbeResult` to people: a rich table of the trials, summary lines, and a PNG plot.

This is the user-interface layer, so it may import rich; the library core never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from .accumulation import plan_accumulation
from .results import MemoryBreakdown, ProbeResult, Trial

if TYPE_CHECKING:  # matplotlib is optional and imported only when plotting
    from matplotlib.axes import Axes

__all__ = ["breakdown_table", "plot", "summary_lines", "trials_table"]

_GIB = 2**30
_MIB = 2**20
_OUTCOME_LABELS = {"ok": "ok", "oom": "OOM", "over_limit": "over limit"}

# Plot colours (matplotlib's tab10), fixed so a reader of one plot can read the next one.
_OK_COLOR = "#1f77b4"
_FAILED_COLOR = "#d62728"
_LIMIT_COLOR = "#d62728"
_BUDGET_COLOR = "#ff7f0e"
_FIT_COLOR = "#9467bd"
_CHOSEN_COLOR = "#2ca02c"


def _last_ok_index(trials: tuple[Trial, ...], batch_size: int) -> int | None:
    """The last successful trial at ``batch_size`` (a size may be run twice), or None."""
    matches = [i for i, t in enumerate(trials) if t.ok and t.batch_size == batch_size]
    return matches[-1] if matches else None


def _gib(size: int | None) -> str:
    return "-" if size is None else f"{size / _GIB:.2f}"


def trials_table(result: ProbeResult) -> Table:
    """One row per trial, in the order they ran, with the recommended and max verified rows marked.

    Memory is in GiB with two decimals, like the JSON output's bytes divided by 2**30. When the
    recommended size was not itself probed (the bisect strategy keeps headroom below the largest
    verified size), the caption says so instead of marking a row.

    Example:
        >>> import io
        >>> from rich.console import Console
        >>> from mps_autobatch.results import ProbeResult, Trial
        >>> trial = Trial(8, "ok", 3 * 2**30, 2 * 2**30, 0.25, 32.0, True)
        >>> r = ProbeResult(batch_size=8, max_batch_size=8, device="cpu", limit_bytes=4 * 2**30,
        ...     limit_source="memory_limit", budget_bytes=3 * 2**30 + 2**29, headroom=0.125, fixed_bytes=None,
        ...     per_sample_bytes=None, strategy="measure", note="", steps_per_trial=1, requested=None,
        ...     accumulation=None, trials=(trial,), elapsed_s=1.0)
        >>> console = Console(record=True, width=120, file=io.StringIO())
        >>> console.print(trials_table(r))
        >>> text = console.export_text()
        >>> "75.0%" in text, "◀ recommended, max verified" in text
        (True, True)
    """
    table = Table(title=f"Trials on {result.device}")
    table.add_column("batch size", justify="right")
    table.add_column("outcome")
    table.add_column("peak GiB", justify="right")
    table.add_column("tensors GiB", justify="right")
    table.add_column("% of limit", justify="right")
    table.add_column("s/step", justify="right")
    table.add_column("samples/s", justify="right")
    table.add_column("")
    recommended = _last_ok_index(result.trials, result.batch_size)
    max_verified = _last_ok_index(result.trials, result.max_batch_size)
    for index, trial in enumerate(result.trials):
        marks = [name for name, i in (("recommended", recommended), ("max verified", max_verified)) if i == index]
        share = "-" if trial.peak_bytes is None else f"{100 * trial.peak_bytes / result.limit_bytes:.1f}%"
        table.add_row(
            str(trial.batch_size),
            _OUTCOME_LABELS[trial.outcome] + (" (cache flushed)" if trial.flushed else ""),
            _gib(trial.peak_bytes),
            _gib(trial.allocated_bytes),
            share,
            "-" if trial.step_s is None else f"{trial.step_s:.3f}",
            "-" if trial.samples_per_s is None else f"{trial.samples_per_s:.1f}",
            "◀ " + ", ".join(marks) if marks else "",
            style="bold" if index == recommended else None,
        )
    if recommended is None:
        table.caption = (
            f"Recommended {result.batch_size} was not probed: it keeps {result.headroom:.0%} headroom below "
            f"the max verified {result.max_batch_size}."
        )
    return table


def breakdown_table(result: ProbeResult) -> Table | None:
    """Where the peak at the recommended size goes, one row per part, in MiB and as a share of the peak.

    Example:
        >>> import io
        >>> from rich.console import Console
        >>> from mps_autobatch.results import MemoryBreakdown, ProbeResult
        >>> parts = MemoryBreakdown(batch_size=8, parameters_bytes=40 * _MIB, gradients_bytes=40 * _MIB,
        ...     optimizer_state_bytes=80 * _MIB, buffers_bytes=0, activations_per_sample_bytes=10 * _MIB,
        ...     activations_bytes=80 * _MIB, other_tensors_bytes=5 * _MIB, overhead_bytes=55 * _MIB,
        ...     peak_bytes=300 * _MIB)
        >>> r = ProbeResult(batch_size=8, max_batch_size=8, device="cpu", limit_bytes=4 * 2**30,
        ...     limit_source="memory_limit", budget_bytes=3 * 2**30, headroom=0.25, fixed_bytes=None,
        ...     per_sample_bytes=None, strategy="measure", note="", steps_per_trial=1, requested=None,
        ...     accumulation=None, trials=(), elapsed_s=1.0, breakdown=parts)
        >>> console = Console(record=True, width=140, file=io.StringIO())
        >>> console.print(breakdown_table(r))
        >>> text = console.export_text()
        >>> "26.7%" in text, "10.0 MiB per sample" in text
        (True, True)
    """
    parts = result.breakdown
    if parts is None:
        return None
    table = Table(title=f"Memory at batch size {parts.batch_size} on {result.device}")
    table.add_column("part")
    table.add_column("MiB", justify="right")
    table.add_column("% of peak", justify="right")
    table.add_column("how it is known")
    known = {
        "activations": "tensor peak's slope"
        + (
            f", {parts.activations_per_sample_bytes / _MIB:.1f} MiB per sample"
            if parts.activations_per_sample_bytes is not None
            else " (one size: not known)"
        ),
        "other tensors": "the tensor peak minus the rows above",
        "allocator and driver overhead": "the peak minus the tensor peak",
    }
    for label, size in parts.rows():
        how = next((text for key, text in known.items() if label.startswith(key)), "exact, from the tensors")
        table.add_row(label, f"{size / _MIB:.1f}", f"{100 * size / parts.peak_bytes:.1f}%", how)
    table.add_row("peak", f"{parts.peak_bytes / _MIB:.1f}", "100.0%", "measured", style="bold")
    return table


def summary_lines(result: ProbeResult) -> list[str]:
    """The answer in a few plain lines, for a terminal or a log.

    Example:
        >>> from mps_autobatch.results import ProbeResult
        >>> r = ProbeResult(batch_size=24, max_batch_size=28, device="mps", limit_bytes=16 * 2**30,
        ...     limit_source="recommended_max_memory", budget_bytes=12 * 2**30 + 2**29, headroom=0.2,
        ...     fixed_bytes=2**30, per_sample_bytes=400 * 2**20, strategy="measure", note="", steps_per_trial=1,
        ...     requested=32, accumulation=(16, 2), trials=(), elapsed_s=12.5)
        >>> for line in summary_lines(r):
        ...     print(line)
        Recommended batch size: 24
        Max verified batch size: 28
        Memory limit: 16.00 GiB (recommended_max_memory)
        Budget: 12.50 GiB (limit minus 20% headroom)
        Fitted peak: 1024.0 MiB + 400.0 MiB per sample
        Strategy: measure
        Requested batch 32: 16 x 2 (micro-batch x accumulation steps)
        Probe time: 12.5 s (0 trials of 1 step each)
    """
    what = "evaluation batch size (forward only)" if result.mode == "eval" else "batch size"
    lines = [
        f"Recommended {what}: {result.batch_size}",
        f"Max verified batch size: {result.max_batch_size}",
        f"Memory limit: {result.limit_bytes / _GIB:.2f} GiB ({result.limit_source})",
        f"Budget: {result.budget_bytes / _GIB:.2f} GiB (limit minus {result.headroom:.0%} headroom)",
    ]
    if result.fixed_bytes is not None and result.per_sample_bytes is not None:
        lines.append(
            f"Fitted peak: {result.fixed_bytes / _MIB:.1f} MiB + {result.per_sample_bytes / _MIB:.1f} MiB per sample"
        )
    lines.append(f"Strategy: {result.strategy}")
    if result.objective == "throughput":
        rates = ", ".join(f"{size}: {rate:.1f}" for size, rate in result.throughput)
        lines.append(
            f"Throughput knee: {result.batch_size} (largest that fits: {result.memory_batch_size}); "
            f"samples/s by size: {rates}"
        )
    if result.note:
        lines.append(f"Note: {result.note}")
    if result.requested is not None:
        micro, steps = result.accumulation or plan_accumulation(result.requested, result.batch_size)
        lines.append(f"Requested batch {result.requested}: {micro} x {steps} (micro-batch x accumulation steps)")
    step_word = "step" if result.steps_per_trial == 1 else "steps"
    lines.append(
        f"Probe time: {result.elapsed_s:.1f} s ({len(result.trials)} trials of {result.steps_per_trial} "
        f"{step_word} each)"
    )
    return lines


def plot(result: ProbeResult, path: str | Path) -> Path:
    """Save a PNG of measured peak memory against batch size.

    Successful trials are blue circles at their peak (grey squares at their tensor peak); failed trials are
    red crosses drawn at the limit (an out-of-memory step has no peak to show). The fitted line is purple and
    dashed, the limit a red line, the budget an orange dashed line, and the recommended size a green dotted
    vertical line with a star where the fit (or its trial) puts its peak.

    Args:
        result: the probe to draw.
        path: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401  (imported first so a missing install gets our message)
    except ImportError as exc:
        raise ImportError("Plotting needs matplotlib. Install it with: pip install 'mps-autobatch[plot]'") from exc
    # Figure + Agg canvas directly, not pyplot: no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = result.breakdown
    figure = Figure(figsize=(8.5 if parts else 7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    if parts is None:
        _draw(figure.add_subplot(), result)
    else:
        axes, bar = figure.subplots(1, 2, width_ratios=[4, 1])
        _draw(axes, result)
        _draw_breakdown(bar, parts, result.limit_bytes)
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, format="png")
    return out


def _draw(axes: Axes, result: ProbeResult) -> None:
    """Draw the trials, fit, limit, budget and chosen size onto matplotlib ``axes``."""
    limit, budget = result.limit_bytes / _GIB, result.budget_bytes / _GIB
    ran = [t for t in result.trials if t.ok and t.peak_bytes is not None]
    failed = [t.batch_size for t in result.trials if not t.ok]
    if ran:
        peaks = [t.peak_bytes / _GIB for t in ran if t.peak_bytes is not None]
        axes.plot([t.batch_size for t in ran], peaks, "o", color=_OK_COLOR, label="ran (peak)")
        tensors = [(t.batch_size, t.allocated_bytes / _GIB) for t in ran if t.allocated_bytes is not None]
        if tensors and tensors != list(zip([t.batch_size for t in ran], peaks)):
            axes.plot(*zip(*tensors), "s", color="0.55", markersize=4, label="tensor peak")
    if failed:
        axes.plot(failed, [limit] * len(failed), "x", color=_FAILED_COLOR, markersize=9, mew=2, label="failed")
    x_max = 1.1 * max([t.batch_size for t in result.trials] + [result.batch_size])
    chosen_y = None
    if result.fixed_bytes is not None and result.per_sample_bytes is not None:
        fixed, per_sample = result.fixed_bytes / _GIB, result.per_sample_bytes / _GIB
        axes.plot([0, x_max], [fixed, fixed + per_sample * x_max], "--", color=_FIT_COLOR, lw=1.5, label="fit")
        chosen_y = fixed + per_sample * result.batch_size
    elif (index := _last_ok_index(result.trials, result.batch_size)) is not None:
        peak = result.trials[index].peak_bytes
        chosen_y = None if peak is None else peak / _GIB
    axes.axhline(limit, color=_LIMIT_COLOR, lw=2, label=f"limit {limit:.2f} GiB")
    axes.axhline(budget, color=_BUDGET_COLOR, lw=2, ls="--", label=f"budget {budget:.2f} GiB")
    axes.axvline(result.batch_size, color=_CHOSEN_COLOR, lw=1.5, ls=":", label=f"recommended {result.batch_size}")
    if chosen_y is not None:
        axes.plot([result.batch_size], [chosen_y], "*", color=_CHOSEN_COLOR, markersize=16)
    axes.set_xlim(0, x_max)
    axes.set_ylim(0, 1.1 * limit)
    axes.set_xlabel("batch size")
    axes.set_ylabel("peak memory (GiB)")
    axes.set_title(f"{result.device}: peak memory vs batch size")
    axes.legend(loc="lower right", fontsize="small")


def _draw_breakdown(axes: Axes, parts: MemoryBreakdown, limit_bytes: int) -> None:
    """One stacked bar: the peak at the recommended size by part, on the same scale as the main plot."""
    bottom = 0.0
    colors = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "0.6"]
    for (label, size), color in zip(parts.rows(), colors):
        axes.bar([0], [size / _GIB], bottom=bottom, color=color, label=label, width=0.6)
        bottom += size / _GIB
    axes.set_ylim(0, 1.1 * limit_bytes / _GIB)
    axes.set_xticks([0], [f"at {parts.batch_size}"])
    axes.set_title("where it goes", fontsize="small")
    axes.legend(loc="upper center", fontsize="x-small", bbox_to_anchor=(0.5, -0.12))
