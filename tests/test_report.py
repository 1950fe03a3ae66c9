"""Rendering a ProbeResult: the trials table, the summary lines and the PNG plot."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from mps_autobatch.report import plot, summary_lines, trials_table
from mps_autobatch.results import ProbeResult, Trial

GIB = 2**30
MIB = 2**20

# resnet50 on a 16 GiB MPS limit with 20% headroom (budget 12.8 GiB), peak ~ 1.5 GiB + 0.4375 GiB per
# sample: 24 is the largest size within the budget, 28 ran but past the budget, 40 ran out of memory
# and 32 went over the limit.
TRIALS = (
    Trial(16, "ok", int(8.5 * GIB), int(6.75 * GIB), 0.25, 64.0, True),
    Trial(40, "oom", None, None, None, None, False, error="MPS backend out of memory"),
    Trial(32, "over_limit", int(16.5 * GIB), int(13.2 * GIB), 0.61, 52.5, False),
    Trial(24, "ok", 12 * GIB, int(9.75 * GIB), 0.375, 64.0, True),
    Trial(28, "ok", int(14 * GIB), int(11.3 * GIB), 0.44, 63.6, False),
)
RESULT = ProbeResult(
    batch_size=24,
    max_batch_size=28,
    device="mps",
    limit_bytes=16 * GIB,
    limit_source="recommended_max_memory",
    budget_bytes=int(12.8 * GIB),
    headroom=0.2,
    fixed_bytes=1536 * MIB,
    per_sample_bytes=448 * MIB,
    strategy="measure",
    note="",
    steps_per_trial=2,
    requested=32,
    accumulation=(16, 2),
    trials=TRIALS,
    elapsed_s=37.31,
)


def _render(result: ProbeResult) -> list[str]:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(trials_table(result))
    return console.export_text().splitlines()


def _row(lines: list[str], batch_size: int) -> str:
    rows = [line for line in lines if line.split("│")[1:2] and line.split("│")[1].strip() == str(batch_size)]
    assert len(rows) == 1, lines
    return rows[0]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.split("│")[1:-1]]


@pytest.mark.parametrize(
    ("batch_size", "cells"),
    [
        # ran within the budget: the recommended row
        (24, ["24", "ok", "12.00", "9.75", "75.0%", "0.375", "64.0", "◀ recommended"]),
        # ran within the limit, past the budget: the max verified row
        (28, ["28", "ok", "14.00", "11.30", "87.5%", "0.440", "63.6", "◀ max verified"]),
        # failures
        (40, ["40", "OOM", "-", "-", "-", "-", "-", ""]),
        (32, ["32", "over limit", "16.50", "13.20", "103.1%", "0.610", "52.5", ""]),
        # first, small trial
        (16, ["16", "ok", "8.50", "6.75", "53.1%", "0.250", "64.0", ""]),
    ],
)
def test_trials_table_rows(batch_size: int, cells: list[str]) -> None:
    lines = _render(RESULT)

    assert _cells(_row(lines, batch_size)) == cells


def test_a_trial_whose_step_flushed_the_cache_says_so() -> None:
    # 28 read 11.2 GiB, under the budget, but driver memory fell inside the step: the allocator flushed its cache.
    flushed = Trial(28, "ok", int(11.2 * GIB), int(11.1 * GIB), 0.44, 63.6, False, flushed=True)
    result = dataclasses.replace(RESULT, trials=(*TRIALS[:4], flushed))

    assert _cells(_row(_render(result), 28))[:3] == ["28", "ok (cache flushed)", "11.20"]


def test_trials_table_keeps_trial_order_and_right_aligns_numbers() -> None:
    lines = _render(RESULT)

    batch_column = [_cells(line)[0] for line in lines if line.startswith("│") and _cells(line)[0].isdigit()]
    assert batch_column == ["16", "40", "32", "24", "28"]
    peaks = [line.split("│")[3] for line in lines if line.startswith("│") and _cells(line)[0].isdigit()]
    assert peaks[0].endswith("8.50 ") and peaks[0].startswith("   ")  # padded on the left
    assert "Trials on mps" in lines[0]


def test_trials_table_one_row_both_marks() -> None:
    result = ProbeResult(
        batch_size=16,
        max_batch_size=16,
        device="cuda",
        limit_bytes=8 * GIB,
        limit_source="memory_limit",
        budget_bytes=int(6.4 * GIB),
        headroom=0.2,
        fixed_bytes=None,
        per_sample_bytes=None,
        strategy="measure",
        note="",
        steps_per_trial=1,
        requested=None,
        accumulation=None,
        trials=(TRIALS[0],),
        elapsed_s=3.0,
    )

    assert _cells(_row(_render(result), 16))[-1] == "◀ recommended, max verified"


def test_trials_table_unprobed_recommendation_is_in_the_caption() -> None:
    # bisect keeps headroom below the largest verified size, a size that was never run
    result = ProbeResult(
        batch_size=22,
        max_batch_size=28,
        device="mps",
        limit_bytes=16 * GIB,
        limit_source="recommended_max_memory",
        budget_bytes=int(12.8 * GIB),
        headroom=0.2,
        fixed_bytes=None,
        per_sample_bytes=None,
        strategy="bisect",
        note="driver memory counters unavailable",
        steps_per_trial=1,
        requested=None,
        accumulation=None,
        trials=TRIALS,
        elapsed_s=30.0,
    )

    lines = _render(result)

    assert not any("recommended" in _cells(line)[-1] for line in lines if line.startswith("│") and "│" in line[1:])
    text = " ".join(line.strip() for line in lines)
    assert "Recommended 22 was not probed: it keeps 20% headroom below the max verified 28." in text


def test_summary_lines() -> None:
    assert summary_lines(RESULT) == [
        "Recommended batch size: 24",
        "Max verified batch size: 28",
        "Memory limit: 16.00 GiB (recommended_max_memory)",
        "Budget: 12.80 GiB (limit minus 20% headroom)",
        "Fitted peak: 1536.0 MiB + 448.0 MiB per sample",
        "Strategy: measure",
        "Requested batch 32: 16 x 2 (micro-batch x accumulation steps)",
        "Probe time: 37.3 s (5 trials of 2 steps each)",
    ]


def test_summary_lines_bisect_with_note_and_no_stored_plan() -> None:
    result = ProbeResult(
        batch_size=24,
        max_batch_size=30,
        device="cpu",
        limit_bytes=8 * GIB,
        limit_source="memory_limit",
        budget_bytes=int(6.4 * GIB),
        headroom=0.2,
        fixed_bytes=None,
        per_sample_bytes=None,
        strategy="bisect",
        note="no memory counters on this device",
        steps_per_trial=1,
        requested=50,
        accumulation=None,
        trials=(),
        elapsed_s=4.0,
    )

    lines = summary_lines(result)

    assert "Note: no memory counters on this device" in lines
    assert "Requested batch 50: 17 x 3 (micro-batch x accumulation steps)" in lines  # 17 + 17 + 16
    assert not any(line.startswith("Fitted peak") for line in lines)


def _hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)]) / 255


def _pixels_near(image: np.ndarray, color: str, tolerance: float = 0.03) -> int:
    return int((np.abs(image[..., :3] - _hex_rgb(color)).max(axis=-1) < tolerance).sum())


def test_plot_draws_the_lines(tmp_path: Path) -> None:
    image_module = pytest.importorskip("matplotlib.image")

    path = plot(RESULT, tmp_path / "probe.png")

    assert path == tmp_path / "probe.png"
    image = image_module.imread(path)
    assert image.shape[:2] == (450, 700)
    colors = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50
    # limit (red, 2 px across the axes), budget (orange dashes), recommended (green dots and star),
    # fit (purple dashes), ok trials (blue circles)
    assert _pixels_near(image, "#d62728") > 600
    assert _pixels_near(image, "#ff7f0e") > 300
    assert _pixels_near(image, "#2ca02c") > 150
    assert _pixels_near(image, "#9467bd") > 300
    assert _pixels_near(image, "#1f77b4") > 100


def test_plot_without_fit(tmp_path: Path) -> None:
    image_module = pytest.importorskip("matplotlib.image")
    result = ProbeResult(
        batch_size=24,
        max_batch_size=28,
        device="mps",
        limit_bytes=16 * GIB,
        limit_source="recommended_max_memory",
        budget_bytes=int(12.8 * GIB),
        headroom=0.2,
        fixed_bytes=None,
        per_sample_bytes=None,
        strategy="bisect",
        note="",
        steps_per_trial=1,
        requested=None,
        accumulation=None,
        trials=TRIALS,
        elapsed_s=30.0,
    )

    image = image_module.imread(plot(result, tmp_path / "bisect.png"))

    assert _pixels_near(image, "#9467bd") < 5  # no fitted line
    assert _pixels_near(image, "#d62728") > 600


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError

    with pytest.raises(ImportError, match=r"pip install 'mps-autobatch\[plot\]'"):
        plot(RESULT, tmp_path / "probe.png")

    assert not (tmp_path / "probe.png").exists()
