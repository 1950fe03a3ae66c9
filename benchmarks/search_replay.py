"""The search replayed on memory curves recorded on the simulated Mac: sizes tried, answer, estimated cost.

    python -m benchmarks.search_replay                     # replay the saved curves with this checkout's search
    python -m benchmarks.search_replay --against fccfa24^  # ... and with the search at another git revision
    python -m benchmarks.search_replay --record            # record the curves again first (about 15 min on 2 cores)
    python -m benchmarks.search_replay --random 3000       # ... and on random staircase curves too (a minute)

A curve is one real training step per batch size on the simulated Mac (peak driver bytes, live bytes and wall
seconds of a first step at that size), recorded once; the replay reads both the peak and the live (tensor) bytes,
and random curves carry their exact affine part as tensor bytes; replaying the search on it takes milliseconds,
so a change to
the search can be judged on many models without a 30-minute benchmark. Sizes between recorded ones are linearly
interpolated, and a step's cost is a straight line fitted to the recorded seconds: *step-eq.* here is the sum of
those costs (warm-up included) over the cost at the budget truth, an estimate. `compare_finders` measures it.
The first four cases are compare_finders'. The other six were recorded after the search was changed to aim lower, to
check it on models the benchmark does not use; deit_tiny's curve then prompted the rule on which point a line is drawn
from, so only five are untouched by the tuning.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import date
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
CURVES = RESULTS / "memory_curves.json"
GiB, MiB = 2**30, 2**20
HEADROOM = 0.2
_DENSE = {
    "test_efficientnet": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, *range(240, 341, 4)]
    + [360, 400, 469, 480],
    "test_vit": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320, 400, 480, 540, *range(600, 1001, 10)]
    + [1100, 1218, 1240],
    "resnet18": [*range(1, 61), 70, 80, 104, 110],
    "efficientnet_b0": list(range(1, 42)),
}
# (model, image size, simulated limit GiB): compare_finders' four cases, then six held out.
CASES = [
    ("test_efficientnet", 128, 2.0),
    ("test_vit", 128, 2.0),
    ("resnet18", 128, 1.0),
    ("efficientnet_b0", 160, 2.0),
    ("mobilenetv3_small_100", 128, 1.0),
    ("convnext_atto", 96, 1.0),
    ("deit_tiny_patch16_224", 112, 1.0),
    ("regnetx_002", 128, 0.75),
    ("resnet10t", 112, 1.5),
    ("efficientnet_b1", 96, 1.5),
]


# --- recording (torch work) ------------------------------------------------------------------------------------
def record_one(model_name: str, image_size: int, limit_gib: float) -> dict:
    """One step per size, each after emptying the cache (as the search's trials do)."""
    import timm
    import torch

    from benchmarks.compare_finders import stepper
    from mps_autobatch.simulate import SimulatedMPS, SimulatedMPSBackend
    from mps_autobatch.workload import make_workload

    limit = int(limit_gib * GiB)
    backend = SimulatedMPSBackend(SimulatedMPS(16 * GiB))
    torch.manual_seed(0)
    extra = {"img_size": image_size} if model_name.startswith("deit") else {}
    model = timm.create_model(model_name, num_classes=1000, **extra)
    with make_workload(model, device=backend.device, input_shape=(3, image_size, image_size)) as workload:
        with backend.session(limit):
            workload.warm_up(2)
            backend.clear_cache()
            with backend.measure() as idle:
                pass

            step = stepper(backend, workload)
            run = lambda size: step(size).peak  # noqa: E731

            if model_name in _DENSE:
                for size in _DENSE[model_name]:
                    run(size)
            else:  # double past the budget, then 8 sizes below it and 61 from a quarter of it to 1.5 times it
                over, began = 1, time.time()
                while (peak := run(over)) is not None and peak <= limit * (1 - HEADROOM):
                    over *= 2
                for k in range(1, 9):
                    run(max(1, round(over / 2 ** (k / 2))))
                low = max(1, over // 4)
                for size in sorted({round(low + (over * 1.5 - low) * i / 60) for i in range(61)}):
                    if time.time() - began > 150:
                        break
                    run(size)
    return {
        "image_size": image_size,
        "limit": limit,
        "idle_peak": idle.peak_bytes,
        "idle_alloc": idle.allocated_bytes,
        "rows": sorted([size, *row] for size, row in step.seen.items()),
    }


# --- replaying (no torch work) ---------------------------------------------------------------------------------
def _load_search(revision: str | None) -> types.ModuleType:
    if revision is None:
        from mps_autobatch import search

        module = search
    else:
        source = subprocess.run(
            ["git", "show", f"{revision}:mps_autobatch/search.py"], check=True, capture_output=True, text=True
        ).stdout
        path = Path(tempfile.mkdtemp()) / "search_at_revision.py"
        path.write_text(
            source.replace("from . import", "from mps_autobatch import").replace("from .", "from mps_autobatch.")
        )
        spec = importlib.util.spec_from_file_location("search_at_revision", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    if hasattr(
        module, "gc"
    ):  # before the policy module, the search itself collected garbage: the curves allocate nothing
        module.gc = types.SimpleNamespace(collect=lambda: 0)  # type: ignore[attr-defined]
    return module


def replay(curve: dict, search_module: types.ModuleType) -> dict:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from memory_curves import Curve, CurveBackend, CurveWorkload

    ran = [row for row in curve["rows"] if row[1] is not None]
    sizes, peaks, tensors, seconds = (np.array([row[i] for row in ran]) for i in (0, 1, 2, 3))
    top = max(row[0] for row in curve["rows"])
    first_oom = min((row[0] for row in curve["rows"] if row[1] is None), default=top + 1)
    every = np.arange(top + 1)
    interpolated = np.interp(every, np.r_[0, sizes], np.r_[curve["idle_peak"], peaks])
    limit = curve["limit"]
    peak_at = [int(p) if size < first_oom else 2 * limit for size, p in zip(every, interpolated)]
    tensors_at = [int(t) for t in np.interp(every, np.r_[0, sizes], np.r_[curve["idle_alloc"], tensors])]
    per_sample, fixed = np.polyfit(sizes, seconds, 1)

    def cost(size: int) -> float:
        return max(fixed, 0.02) + per_sample * size

    budget_truth = next(size for size in range(1, top + 1) if peak_at[size] > int(limit * (1 - HEADROOM))) - 1
    backend = CurveBackend(Curve(tuple(peak_at), limit, tuple(tensors_at)))
    workload = CurveWorkload(backend)
    result = search_module.search(workload, backend, backend.limit(), headroom=HEADROOM, max_batch_size=top)
    return {
        "budget_truth": budget_truth,
        "sizes": workload.sizes,
        "batch_size": result.batch_size,
        "ratio_to_budget_truth": round(result.batch_size / budget_truth, 3),
        "step_equivalents": round(sum(map(cost, workload.warm_ups + workload.sizes)) / cost(budget_truth), 2),
    }


def random_curves(count: int, seed: int) -> list[tuple[list[int], int, list[int]]]:
    """Staircase curves like the recorded ones, ``(peaks, limit, tensors)``: affine, with a fixed workspace at one
    sample or more (up to 20% of the limit), noise up to 4 samples and allocator blocks up to 8% of it; the
    tensors are the affine part (no noise, no blocks)."""
    draw, curves = random.Random(seed), []
    while len(curves) < count:
        limit = draw.randint(256 * MiB, 64 * GiB)
        rest = int(limit * draw.uniform(0, 0.6))
        fitting = int(math.exp(draw.uniform(math.log(8), math.log(3000))))
        slope = (limit - rest) / (fitting + 0.5)
        noise = draw.choice([0, draw.uniform(0, 4)]) * slope
        block = draw.choice([None, int(limit * draw.uniform(0.005, 0.08))])
        workspace = draw.choice([0, draw.uniform(0, 0.2)]) * limit
        noise_seed, peaks, tensors, highest = draw.randrange(2**32), [], [], 0
        for size in range(4097):
            exact = rest + slope * size + (workspace if size else 0)
            value = exact + noise * random.Random(noise_seed * 8192 + size).random()
            if block:
                value = math.ceil(value / block) * block
            highest = max(highest, int(value))  # a larger batch never needs less
            peaks.append(highest)
            tensors.append(int(exact))
        if peaks[2] <= limit * (1 - HEADROOM):
            curves.append((peaks, limit, tensors))
    return curves


def replay_random(curves: list[tuple[list[int], int, list[int]]], search_module: types.ModuleType) -> dict:
    """Trials, estimated step-equivalents (a step costs 0.2 + size / budget truth) and answer ÷ budget truth."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from memory_curves import Curve, CurveBackend, CurveWorkload

    rows = []
    for peaks, limit, tensors in curves:
        budget = int(limit * (1 - HEADROOM))
        truth = next((size for size in range(1, len(peaks)) if peaks[size] > budget), len(peaks)) - 1
        backend = CurveBackend(Curve(tuple(peaks), limit, tuple(tensors)))
        workload = CurveWorkload(backend)
        result = search_module.search(
            workload, backend, backend.limit(), headroom=HEADROOM, max_batch_size=len(peaks) - 1
        )
        cost = sum(0.2 + min(size, 1.2 * truth) / truth for size in workload.warm_ups + workload.sizes) / 1.2
        rows.append((len(result.trials), cost, result.batch_size / truth))
    return {
        "curves": len(rows),
        "mean_trials": round(statistics.mean(r[0] for r in rows), 2),
        "mean_step_equivalents": round(statistics.mean(r[1] for r in rows), 2),
        "share_within_3_step_equivalents": round(sum(r[1] <= 3 for r in rows) / len(rows), 3),
        "mean_answer_to_truth": round(statistics.mean(r[2] for r in rows), 3),
        "share_under_95_percent": round(sum(r[2] < 0.95 for r in rows) / len(rows), 3),
    }


def markdown(report: dict) -> str:
    searches = list(report["searches"])
    lines = [
        f"# The search replayed on recorded memory curves ({report['date']})",
        "",
        f"Command: `{report['command']}`. Curves: `benchmarks/results/memory_curves.json`, recorded on the "
        "simulated Mac (2-core x86_64 CPU). Step-eq. is estimated from a line fitted to the recorded step times.",
        "",
        "| case | budget truth | "
        + " | ".join(f"{name}: sizes tried → answer (÷ truth), step-eq." for name in searches)
        + " |",
        "|---|---:|" + "---|" * len(searches),
    ]
    for case in report["cases"]:
        cells = [
            f"{r['sizes']} → **{r['batch_size']}** ({r['ratio_to_budget_truth']}), {r['step_equivalents']}"
            for r in (case["replays"][name] for name in searches)
        ]
        where = " *not in compare_finders*" if case["held_out"] else ""
        label = f"{case['model']} @ {case['image_size']} ({case['limit_gib']} GiB){where}"
        lines.append(f"| {label} | {case['budget_truth']} | " + " | ".join(cells) + " |")
    lines += ["", "| search | step-eq. summed | cases over 3 step-eq. | lowest answer ÷ truth |"]
    lines += ["|---|---:|---:|---:|"]
    for name in searches:
        rows = [case["replays"][name] for case in report["cases"]]
        lines.append(
            f"| {name} | {sum(r['step_equivalents'] for r in rows):.2f} | "
            f"{sum(r['step_equivalents'] > 3 for r in rows)} | {min(r['ratio_to_budget_truth'] for r in rows)} |"
        )
    if report.get("random"):
        lines += ["", f"Random staircase curves ({report['random_note']}):", ""]
        lines += ["| search | " + " | ".join(next(iter(report["random"].values()))) + " |"]
        lines += ["|---|" + "---:|" * len(next(iter(report["random"].values())))]
        for name, summary in report["random"].items():
            lines.append(f"| {name} | " + " | ".join(str(v) for v in summary.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="record the curves again (torch work, about 15 min)")
    parser.add_argument("--against", metavar="REV", action="append", help="also replay the search at this revision")
    parser.add_argument("--random", metavar="N", type=int, default=0, help="also replay on N random curves")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.record:
        curves = {}
        for model, size, limit in CASES:
            curves[model] = record_one(model, size, limit)
            print(f"recorded {model} @ {size}: {len(curves[model]['rows'])} sizes", flush=True)
            CURVES.write_text(json.dumps(curves))
    curves = json.loads(CURVES.read_text())
    searches = {"this checkout": _load_search(None)}
    for revision in args.against or []:
        searches[f"at {revision}"] = _load_search(revision)
    report = {
        "date": date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.search_replay", *sys.argv[1:]]),
        "searches": list(searches),
        "cases": [
            {
                "model": model,
                "image_size": size,
                "limit_gib": limit,
                "held_out": index >= 4,
                "budget_truth": replay(curves[model], next(iter(searches.values())))["budget_truth"],
                "replays": {name: replay(curves[model], module) for name, module in searches.items()},
            }
            for index, (model, size, limit) in enumerate(CASES)
        ],
    }
    if args.random:
        curves_drawn = random_curves(args.random, seed=1)
        report["random_note"] = f"{args.random} drawn with seed 1, as in `random_curves`"
        report["random"] = {name: replay_random(curves_drawn, module) for name, module in searches.items()}
    (RESULTS / "search_replay.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "search_replay.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
