"""How fast the `autobatch` command answers when it has nothing to compute: help, and a cached probe.

    python -m benchmarks.cli_latency            # writes benchmarks/results/cli_latency.{json,md}

Each command runs as a whole new process (subprocess, wall time by time.perf_counter), the cases in turn
(A B C D A B C D ...) so that a drift in the machine's speed hits them alike, after one uncounted round.
The cache hit is a real ``autobatch probe`` answered from a cache folder that one probe filled first; the
bare ``python -c "import torch"`` is the floor any command that reads a device must pay.

Goals (issue 12): ``--help`` at most 0.5 s; a cache hit at most 1.3 x the bare torch import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROBE = ["probe", "--model", "test_efficientnet", "--image-size", "32", "--simulate", "mps:16GiB", "--memory-limit"]
PROBE += ["256MiB"]


def _cases() -> dict[str, list[str]]:
    autobatch = [sys.executable, "-m", "mps_autobatch"]
    return {
        "autobatch --help": [*autobatch, "--help"],
        "autobatch probe --help": [*autobatch, "probe", "--help"],
        "autobatch probe (cache hit)": [*autobatch, *PROBE],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }


def _wall(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    return time.perf_counter() - began


def measure(rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "AUTOBATCH_CACHE_DIR": cache, "NO_ALBUMENTATIONS_UPDATE": "1"}
        subprocess.run([sys.executable, "-m", "mps_autobatch", *PROBE], env=env, check=True, capture_output=True)
        cases = _cases()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(rounds + 1):
            for name, command in cases.items():
                seconds = _wall(command, env)
                if round_:  # the first round warms the file cache and is not counted
                    times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    torch_s = medians['python -c "import torch"']
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "rounds": rounds,
        "cases": {
            name: {
                "median_s": medians[name],
                "min_s": min(values),
                "max_s": max(values),
                "vs_torch": medians[name] / torch_s,
            }
            for name, values in times.items()
        },
        "goals": {
            "help_s": {"goal": 0.5, "measured": medians["autobatch --help"], "met": medians["autobatch --help"] <= 0.5},
            "hit_vs_torch": {
                "goal": 1.3,
                "measured": medians["autobatch probe (cache hit)"] / torch_s,
                "met": medians["autobatch probe (cache hit)"] / torch_s <= 1.3,
            },
        },
    }


def markdown(report: dict) -> str:
    lines = [
        "# CLI latency",
        "",
        f"{report['date']}, {report['machine']}; median of {report['rounds']} runs each, interleaved, whole "
        "processes (`python -m benchmarks.cli_latency`).",
        "",
        "| command | median s | min s | max s | × bare torch import |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, case in report["cases"].items():
        seconds = " | ".join(f"{case[key]:.3f}" for key in ("median_s", "min_s", "max_s"))
        lines.append(f"| `{name}` | {seconds} | {case['vs_torch']:.2f} |")
    help_goal, hit_goal = report["goals"]["help_s"], report["goals"]["hit_vs_torch"]
    lines += [
        "",
        f"- `--help` ≤ {help_goal['goal']} s: {help_goal['measured']:.3f} s, "
        f"{'met' if help_goal['met'] else 'missed'}.",
        f"- cache hit ≤ {hit_goal['goal']} × the bare torch import: {hit_goal['measured']:.2f} ×, "
        f"{'met' if hit_goal['met'] else 'missed'}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="counted runs of each command")
    args = parser.parse_args()
    report = measure(args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "cli_latency.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
