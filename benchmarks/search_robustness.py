"""The search on allocators it was not written against: every model on every simulated allocator variant.

    python -m benchmarks.search_robustness [--quick]   # writes benchmarks/results/search_robustness.{json,md}

For each model and each `mps_autobatch.simulate.ALLOCATOR_VARIANTS` entry, on a fresh simulated Mac with that
allocator: the budget truth and max truth found on that variant (doubling, then bisection; a size fits the budget
when the simulation's true high-water mark of driver memory, at every allocation, stays within it; on a curve that
is not monotone, the largest size under the first size that does not fit, with the largest fitting size found by
bisection reported too), then ours with
default settings, then a follow-up at our answer (20 training steps, a short last batch of a third, 3 eval batches)
whose true high-water mark is reported as a fraction of the limit. Lightning's BatchSizeFinder (power and binsearch)
and Accelerate's find_executable_batch_size run on the default allocator, for the timm models.
Step-equivalents: the finder's wall time over one training step at the budget truth, timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import timm
import torch
from torch import nn

from benchmarks import compare_finders
from mps_autobatch import find_safe_batch_size
from mps_autobatch.oom import is_oom_error
from mps_autobatch.simulate import ALLOCATOR_VARIANTS, SimulatedMPS, SimulatedMPSBackend
from mps_autobatch.workload import make_workload

RESULTS = Path(__file__).parent / "results"
MiB, GiB = 2**20, 2**30
HEADROOM = 0.2
COMMAND = "python -m benchmarks.search_robustness"
# Three of the five variants per run keep it near 12 minutes on 2 cores; --all-variants runs the five.
VARIANTS = ["default", "pow2-heaps", "flush-at-90"]
# Variants whose readings depend on the sizes run before: their truths are measured one fresh device per size.
FRESH = {name: model.graph_bytes_per_shape > 0 for name, model in ALLOCATOR_VARIANTS.items()}
# (name, what it builds, input shape, classes, limit): the flat staircase MLP first.
MODELS = [
    ("mlp 256-2048-2048-10", "mlp", (256,), 10, 256 * MiB),
    ("resnet18 @ 64", "resnet18", (3, 64, 64), 1000, 1 * GiB),
    ("mobilenetv3_small_100 @ 96", "mobilenetv3_small_100", (3, 96, 96), 1000, 512 * MiB),
    ("test_vit @ 96", "test_vit", (3, 96, 96), 1000, 512 * MiB),
]


def build(kind: str, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    extra = {"img_size": 96} if kind == "test_vit" else {}
    return timm.create_model(kind, num_classes=classes, **extra)


def backend_for(variant: str) -> SimulatedMPSBackend:
    return SimulatedMPSBackend(SimulatedMPS(16 * GiB, allocator=ALLOCATOR_VARIANTS[variant]))


def _high_water_step(backend: SimulatedMPSBackend, workload, size: int) -> tuple[int | None, float]:
    """One training step at ``size``: (true high-water bytes, or None after an out-of-memory error; seconds)."""
    backend.clear_cache()
    backend.sim.reset_high_water()
    began = time.perf_counter()
    failed = False
    try:
        workload.step(size)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        traceback.clear_frames(exc.__traceback__)  # their locals pin the failed step's tensors
        failed = True
    if failed:  # outside the except block, so the traceback is gone too
        workload.recover()
        backend.release_failed_step()
        return None, time.perf_counter() - began
    return backend.sim.high_water_bytes, time.perf_counter() - began


def _fresh_high_water(kind: str, shape, classes: int, limit: int, variant: str, size: int) -> tuple[int | None, float]:
    """One step at ``size`` on a fresh device after the same warm-up, as a new process would run it."""
    backend = backend_for(variant)
    with make_workload(build(kind, classes), device=backend.device, input_shape=shape, num_classes=classes) as work:
        with backend.session(limit):
            work.warm_up(2)
            return _high_water_step(backend, work, size)


def truths(kind: str, shape, classes: int, limit: int, variant: str) -> dict:
    budget = int(limit * (1 - HEADROOM))
    if FRESH[variant]:
        # Other allocations that grow with every shape seen make a reading depend on what ran before: each
        # size is measured on a fresh device, as a new process would run it.
        return _search_truths(lambda size: _fresh_high_water(kind, shape, classes, limit, variant, size), budget)
    backend = backend_for(variant)
    with make_workload(build(kind, classes), device=backend.device, input_shape=shape, num_classes=classes) as work:
        with backend.session(limit):
            work.warm_up(2)
            return _search_truths(lambda size: _high_water_step(backend, work, size), budget)


def _search_truths(step, budget: int) -> dict:
    seen: dict[int, int | None] = {}

    def high(size: int) -> int | None:
        if size not in seen:
            seen[size] = step(size)[0]
        return seen[size]

    def bisect(ok, low: int, high_: int) -> int:
        while high_ - low > 1:
            mid = (low + high_) // 2
            low, high_ = (mid, high_) if ok(mid) else (low, mid)
        return low

    ran = lambda s: high(s) is not None  # noqa: E731
    low, top = 1, 16
    while ran(top):
        low, top = top, top * 2
    max_truth = bisect(ran, low, top)
    fits = lambda s: ran(s) and high(s) <= budget  # noqa: E731
    under = max((s for s, h in seen.items() if h is not None and h <= budget), default=1)
    over = min((s for s, h in seen.items() if s > under and (h is None or h > budget)), default=max_truth + 1)
    largest_fitting = bisect(fits, under, over) if fits(under) else 0
    # Peak memory need not rise with the batch (an allocator's reuse can make a larger batch fit where a smaller
    # one did not): look for a size under the budget truth that does not fit, on an 8 % grid from a quarter of
    # it, and take the truth under the first such size.
    grid, size = [], max(1, largest_fitting // 4)
    while size < largest_fitting:
        grid.append(size)
        size = max(size + 1, int(size * 1.08))
    first_over = next((g for g in grid if not fits(g)), None)
    if first_over is None:
        budget_truth = largest_fitting
    else:
        below = max((g for g in grid if g < first_over), default=1)
        budget_truth = bisect(fits, below, first_over) if fits(below) else 0
    step(budget_truth)  # warm for this shape
    return {
        "max_truth": max_truth,
        "budget_truth": budget_truth,
        "largest_fitting": largest_fitting,
        "step_s_at_budget_truth": round(step(budget_truth)[1], 3),
    }


def ours(kind: str, shape, classes: int, limit: int, variant: str) -> dict:
    model = build(kind, classes)
    began = time.perf_counter()
    result = find_safe_batch_size(
        model,
        input_shape=shape,
        num_classes=classes,
        device=backend_for(variant),
        memory_limit=limit,
        headroom=HEADROOM,
        cache=False,
    )
    wall = time.perf_counter() - began
    chosen = next(t for t in result.trials if t.batch_size == result.batch_size and t.fits_budget)
    return {
        "batch_size": result.batch_size,
        "sizes": [t.batch_size for t in result.trials],
        "trials": len(result.trials),
        "flushed_trials": sum(t.flushed for t in result.trials),
        "peak_of_answer_mib": round(chosen.peak_bytes / MiB, 1),
        "wall_s": round(wall, 2),
    }


def before(revision: str) -> None:
    """Ours with the search at ``revision`` (today's measurement) on every saved case: case["before"]."""
    from benchmarks.search_replay import _load_search
    from mps_autobatch import probe

    saved = json.loads((RESULTS / "search_robustness.json").read_text())
    probe.search = _load_search(revision).search  # type: ignore[attr-defined]
    for case in saved["cases"]:
        _, kind, shape, classes, limit = next(m for m in MODELS if m[0] == case["model"])
        row = ours(kind, shape, classes, limit, case["variant"])
        row["ratio_to_budget_truth"] = round(row["batch_size"] / case["truth"]["budget_truth"], 3)
        row["step_equivalents"] = round(row["wall_s"] / case["truth"]["step_s_at_budget_truth"], 1)
        case["before"] = {"revision": revision, **row}
        print(f"   {case['model']} {case['variant']} before: {row}", flush=True)
        write(saved)


def follow_up(kind: str, shape, classes: int, limit: int, variant: str, size: int) -> dict:
    """20 steps, a short last batch, 3 eval batches at ``size``: OOMs and the true high-water / limit."""
    backend = backend_for(variant)
    highest, status = 0, "ok"
    with make_workload(build(kind, classes), device=backend.device, input_shape=shape, num_classes=classes) as work:
        with backend.session(limit):
            backend.clear_cache()
            backend.sim.reset_high_water()
            try:
                for batch in [size] * 20 + [max(size // 3, 1)]:
                    work.step(batch)
                work.model.eval()
                with torch.no_grad():
                    for _ in range(3):
                        work.model(torch.randn(size, *shape))
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                status = "OOM"
            highest = backend.sim.high_water_bytes
    return {"status": status, "peak_fraction_of_limit": round(highest / limit, 3)}


def peers(kind: str, shape, limit: int, truth: dict) -> dict:
    """Lightning (power, binsearch) and Accelerate from 512 on the default allocator, with the CUDA text."""
    case = compare_finders.Case(kind, shape[-1], limit / GiB)
    if kind == "test_vit":
        return {}  # compare_finders builds timm models at their default image size; test_vit needs img_size
    rows = {}
    for name, run in [
        ("lightning power", lambda: compare_finders.lightning(case, "power", "cuda")),
        ("lightning binsearch", lambda: compare_finders.lightning(case, "binsearch", "cuda")),
        ("accelerate", lambda: compare_finders.accelerate(case, "cuda")),
    ]:
        began = time.perf_counter()
        row = run()
        row["wall_s"] = round(time.perf_counter() - began, 1)
        row["step_equivalents"] = round(row["wall_s"] / truth["step_s_at_budget_truth"], 1)
        row["ratio_to_budget_truth"] = (
            round(row["batch_size"] / truth["budget_truth"], 3) if row["batch_size"] else None
        )
        rows[name] = row
    return rows


def run(quick: bool, variants: list[str], keep: dict | None = None) -> dict:
    report = {
        "date": date.today().isoformat(),
        "command": COMMAND + (" --quick" if quick else "") + (" --all-variants" if len(variants) > 3 else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "cases": [],
    }
    kept = {(c["model"], c["variant"]): c for c in (keep or {}).get("cases", [])}
    for label, kind, shape, classes, limit in MODELS[:1] if quick else MODELS:
        for variant in list(ALLOCATOR_VARIANTS) if keep else variants:
            if keep and variant not in variants:
                if (label, variant) in kept:
                    report["cases"].append(kept[(label, variant)])
                continue
            print(f"== {label} under {limit // MiB} MiB, allocator {variant}", flush=True)
            truth = truths(kind, shape, classes, limit, variant)
            mine = ours(kind, shape, classes, limit, variant)
            mine["ratio_to_budget_truth"] = round(mine["batch_size"] / truth["budget_truth"], 3)
            mine["step_equivalents"] = round(mine["wall_s"] / truth["step_s_at_budget_truth"], 1)
            mine["follow_up"] = follow_up(kind, shape, classes, limit, variant, mine["batch_size"])
            case = {"model": label, "limit_mib": limit // MiB, "variant": variant, "truth": truth, "ours": mine}
            if variant == "default" and kind != "mlp":
                case["peers"] = peers(kind, shape, limit, truth)
            print(f"   {case}", flush=True)
            report["cases"].append(case)
            write(report)
    return report


def goals(case: dict) -> dict[str, bool]:
    ours, limit = case["ours"], case["limit_mib"] * MiB
    return {
        ">= 95% of budget truth": ours["ratio_to_budget_truth"] >= 0.95,
        "peak under budget": ours["peak_of_answer_mib"] * MiB <= limit * (1 - HEADROOM),
        "<= 5 trials": ours["trials"] <= 5,
        "0 follow-up OOMs": ours["follow_up"]["status"] == "ok",
    }


def _before_cell(case: dict) -> str:
    b = case.get("before")
    if b is None:
        return "| -"
    answer = f"{b['batch_size']} ({b['ratio_to_budget_truth']})"
    return f"| at {b['revision']}: {b['sizes']} → {answer}, {b['step_equivalents']}"


def markdown(report: dict) -> str:
    lines = [
        f"# The search on simulated allocator variants ({report['date']})",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}`. Each variant is a rule of "
        "`mps_autobatch.allocator.AllocatorModel` (see `ALLOCATOR_VARIANTS`); truths are found on that variant from "
        "the simulation's true high-water mark. Step-eq.: our wall time over one step at the budget truth.",
        "",
        "| model (limit) | allocator | budget / max truth (largest fitting, if larger) "
        "| ours: sizes tried → answer (÷ budget truth) | trials "
        "| step-eq. | answer's peak MiB (budget) | follow-up: status, high-water ÷ limit | goals missed "
        "| before (search at the revision named): sizes → answer (÷ truth), step-eq. |",
        "|---|---|---|---|---:|---:|---|---|---|---|",
    ]
    for case in report["cases"]:
        t, o = case["truth"], case["ours"]
        budget = round(case["limit_mib"] * (1 - HEADROOM), 1)
        missed = [name for name, met in goals(case).items() if not met]
        if o["step_equivalents"] > 4:
            missed.append("step-eq. <= 4")
        lines.append(
            f"| {case['model']} ({case['limit_mib']} MiB) | {case['variant']} | {t['budget_truth']} / {t['max_truth']}"
            + (f" ({t['largest_fitting']})" if t.get("largest_fitting", t["budget_truth"]) > t["budget_truth"] else "")
            + " "
            f"| {o['sizes']} → **{o['batch_size']}** ({o['ratio_to_budget_truth']}) | {o['trials']} "
            f"| {o['step_equivalents']} | {o['peak_of_answer_mib']} ({budget}) "
            f"| {o['follow_up']['status']}, {o['follow_up']['peak_fraction_of_limit']} | {', '.join(missed) or '-'} "
            + _before_cell(case)
            + " |"
        )
    equivalents = [c["ours"]["step_equivalents"] for c in report["cases"]]
    if equivalents:
        lines += [
            "",
            f"Step-equivalents over all {len(equivalents)} cases: median {statistics.median(equivalents)}, worst "
            f"{max(equivalents)}. Answers ÷ budget truth: lowest "
            f"{min(c['ours']['ratio_to_budget_truth'] for c in report['cases'])}.",
        ]
    with_peers = [c for c in report["cases"] if c.get("peers")]
    if with_peers:
        lines += ["", "Peers on the default allocator (CUDA error text, so their search runs as on a GPU):", ""]
        lines += ["| model | finder | batch size (÷ budget truth) | step-eq. | status |", "|---|---|---|---:|---|"]
        for case in with_peers:
            o = case["ours"]
            lines.append(
                f"| {case['model']} | ours | {o['batch_size']} ({o['ratio_to_budget_truth']}) "
                f"| {o['step_equivalents']} | ok |"
            )
            for name, row in case["peers"].items():
                lines.append(
                    f"| {case['model']} | {name} | {row['batch_size']} ({row['ratio_to_budget_truth']}) "
                    f"| {row['step_equivalents']} | {row.get('status', 'ok').split(' (')[0]} |"
                )
    return "\n".join(lines) + "\n"


def readme_table(report: dict) -> str:
    """The README's table: per model, for each variant, answer ÷ budget truth, trials, step-eq. and follow-up."""
    variants = list(dict.fromkeys(c["variant"] for c in report["cases"]))
    lines = [
        "| model (limit) | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for model in dict.fromkeys(c["model"] for c in report["cases"]):
        cells = []
        for variant in variants:
            case = next((c for c in report["cases"] if (c["model"], c["variant"]) == (model, variant)), None)
            if case is None:
                cells.append("-")
                continue
            o = case["ours"]
            cells.append(
                f"**{o['batch_size']}** ({o['ratio_to_budget_truth']}), {o['trials']} tr., {o['step_equivalents']} "
                f"s-eq., {o['follow_up']['status']} {o['follow_up']['peak_fraction_of_limit']}"
            )
        limit = next(c["limit_mib"] for c in report["cases"] if c["model"] == model)
        lines.append(f"| {model} ({limit} MiB) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_robustness.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "search_robustness.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first model")
    parser.add_argument("--all-variants", action="store_true", help="all five allocator variants, not three")
    parser.add_argument("--variant", action="append", help="rerun only this variant, keeping the saved other cases")
    parser.add_argument("--against", metavar="REV", help="add ours with the search at REV to the saved cases")
    parser.add_argument("--readme", action="store_true", help="print the README's table from the saved .json")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    if args.against:
        warnings.filterwarnings("ignore")
        before(args.against)
        return
    if args.readme:
        print(readme_table(json.loads((RESULTS / "search_robustness.json").read_text())))
        return
    if args.markdown_only:
        write(json.loads((RESULTS / "search_robustness.json").read_text()))
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.variant:
        saved = json.loads((RESULTS / "search_robustness.json").read_text())
        report = run(args.quick, args.variant, keep=saved)
        report["command"] = saved["command"] + "; then " + COMMAND + "".join(f" --variant {v}" for v in args.variant)
        write(report)
        print(markdown(report))
        return
    print(markdown(run(args.quick, list(ALLOCATOR_VARIANTS) if args.all_variants else VARIANTS)))


if __name__ == "__main__":
    main()
