"""Ours against Lightning, Accelerate, an Ultralytics-style estimate and exhaustive truth, on a simulated Mac.

    python -m benchmarks.compare_finders [--quick]   # writes benchmarks/results/compare_finders.{json,md}

Everything runs in one process on the CPU; the limit is enforced by the simulated accelerator
(`mps_autobatch.simulate`). Peers run twice: with the MPS error text (as on a Mac) and with the CUDA
text (so their search itself is compared). Each finder gets a fresh model and a fresh simulated device.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import NamedTuple

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mps_autobatch import find_safe_batch_size
from mps_autobatch.oom import is_oom_error
from mps_autobatch.simulate import SimulatedMPS, SimulatedMPSBackend
from mps_autobatch.workload import make_workload

RESULTS = Path(__file__).parent / "results"
GiB = 2**30
HEADROOM = 0.2
MAC = 16 * GiB
# (model, image size, limit GiB, the issue's limit GiB). The issue asks for one step at the truth in 0.3-3 s; on a
# 2-core CPU resnet18 @ 128 under 3 GiB takes about 4.2 s a step and efficientnet_b0 @ 160 under 4 GiB 4.7 s,
# so those two limits are lowered (to 0.9-1.3 s a step).
CASES = [
    ("test_efficientnet", 128, 2.0, 2.0),
    ("test_vit", 128, 2.0, 2.0),
    ("resnet18", 128, 1.0, 3.0),
    ("efficientnet_b0", 160, 2.0, 4.0),
]
COMMAND = "python -m benchmarks.compare_finders"
FOLLOW_UP_STEPS = 20


class Case:
    """One model @ image size under one simulated limit; builds fresh models and devices."""

    def __init__(self, model: str, image_size: int, limit_gib: float) -> None:
        self.model_name, self.image_size = model, image_size
        self.limit = int(limit_gib * GiB)
        self.budget = int(self.limit * (1 - HEADROOM))
        self.shape = (3, image_size, image_size)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(self.model_name, num_classes=1000)

    def backend(self, style: str = "mps") -> SimulatedMPSBackend:
        return SimulatedMPSBackend(SimulatedMPS(MAC, error_style=style))  # type: ignore[arg-type]


def _first_line(exc: BaseException) -> str:
    return f"failed: {str(exc).splitlines()[0][:160]}"


# --- truth ----------------------------------------------------------------------------------------------------
class Stepped(NamedTuple):
    """One measured training step: peak driver bytes and live bytes (None after an OOM), and wall seconds."""

    peak: int | None
    allocated: int | None
    seconds: float


def stepper(backend, workload) -> Callable[[int], Stepped]:
    """``step(size)``: one training step per size, each after emptying the cache (as ours' trials do), measured once;
    ``step.seen`` holds every size it ran."""
    seen: dict[int, Stepped] = {}

    def step(size: int) -> Stepped:
        if size not in seen:
            backend.clear_cache()
            began = time.perf_counter()
            try:
                with backend.measure() as window:
                    workload.step(size)
                backend.synchronize()
                seen[size] = Stepped(window.peak_bytes, window.allocated_bytes, time.perf_counter() - began)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                workload.recover()
                backend.clear_cache()
                seen[size] = Stepped(None, None, time.perf_counter() - began)
        return seen[size]

    step.seen = seen  # type: ignore[attr-defined]
    return step


def _bisect(fits, low: int, high: int) -> int:
    """Largest size in [low, high) that fits, given fits(low) and not fits(high)."""
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _bracket(seen: dict[int, Stepped], budget: int, high: int) -> tuple[int, int]:
    """The narrowest [low, high) the sizes already stepped leave for the budget truth (peaks rise with size)."""
    under = [size for size, (peak, _, _) in seen.items() if peak is not None and peak <= budget]
    low = max(under, default=1)
    over = [size for size, (peak, _, _) in seen.items() if size > low and (peak is None or peak > budget)]
    return low, min(over, default=high)


def search_truths(case: Case, backend, workload):
    """(max truth, budget truth, the stepper with every size it ran): doubling from 16, then bisection."""
    workload.warm_up(2)
    step = stepper(backend, workload)
    ran = lambda s: step(s).peak is not None  # noqa: E731
    low, high = 1, 16
    while ran(high):
        low, high = high, high * 2
    max_truth = _bisect(ran, low, high)
    under = lambda s: ran(s) and step(s).peak <= case.budget  # noqa: E731
    low, high = _bracket(step.seen, case.budget, max_truth + 1)
    return max_truth, _bisect(under, low, high) if under(low) else 0, step


def truths(case: Case) -> dict:
    backend = case.backend()
    with make_workload(case.model(), device=backend.device, input_shape=case.shape) as workload:
        with backend.session(case.limit):
            max_truth, budget_truth, step = search_truths(case, backend, workload)
            step.seen.pop(budget_truth, None)
            step(budget_truth)  # timed again with a warm cache of this shape
            step_s = step(budget_truth).seconds
    return {
        "max_truth": max_truth,
        "budget_truth": budget_truth,
        "step_s_at_budget_truth": round(step_s, 3),
        "truth_steps": len(step.seen) + 1,
    }


# --- finders --------------------------------------------------------------------------------------------------
def ours(case: Case, objective: str = "memory", find_max: bool = False) -> dict:
    # Default settings, as issue #5 asks for the goals; find_max (exact bracketing of the limit) is its own row.
    result = find_safe_batch_size(
        case.model(),
        input_shape=case.shape,
        device=case.backend(),
        memory_limit=case.limit,
        headroom=HEADROOM,
        objective=objective,
        find_max=find_max,
    )
    return {
        "batch_size": result.batch_size,
        "max_batch_size": result.max_batch_size,
        "steps": len(result.trials) * result.steps_per_trial,
    }


class _Synthetic(Dataset):
    def __init__(self, shape: tuple[int, ...], length: int = 100_000) -> None:
        self.shape, self.length = shape, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.randn(self.shape), index % 1000


def _lit_module(case: Case, counter: list[int], dataset: type[Dataset] = _Synthetic):
    """A minimal LightningModule around the case's model; ``counter`` counts its training and validation steps."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.batch_size = case.model(), 2

        def training_step(self, batch, _):
            counter[0] += 1
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            counter[0] += 1
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

        def train_dataloader(self):
            return DataLoader(dataset(case.shape), batch_size=self.batch_size)

        def val_dataloader(self):
            return DataLoader(dataset(case.shape), batch_size=self.batch_size)

    return Module()


def lightning_trainer(root: str, accelerator: str = "cpu", **settings):
    """A Lightning Trainer that only tunes: one device, one epoch, no logger, checkpoints or progress output."""
    import lightning as L

    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **settings,
    )


def lightning(case: Case, mode: str, style: str) -> dict:
    from lightning.pytorch.tuner import Tuner

    counter = [0]
    module, backend = _lit_module(case, counter), case.backend(style)
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning_trainer(root)
        try:
            with backend.sim.tracking(), backend.session(case.limit):
                size = Tuner(trainer).scale_batch_size(module, mode=mode)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            return {"batch_size": None, "status": _first_line(exc), "steps": counter[0]}
    return {"batch_size": size, "status": "ok", "steps": counter[0]}


def accelerate(case: Case, style: str) -> dict:
    from accelerate.utils import find_executable_batch_size

    backend, counter = case.backend(style), [0]
    with make_workload(case.model(), device=backend.device, input_shape=case.shape) as workload:

        @find_executable_batch_size(starting_batch_size=512)
        def train(batch_size: int) -> int:
            counter[0] += 1
            workload.step(batch_size)
            return batch_size

        try:
            with backend.session(case.limit):
                return {"batch_size": train(), "status": "ok", "steps": counter[0]}
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            return {"batch_size": None, "status": _first_line(exc), "steps": counter[0]}


def ultralytics_style(case: Case) -> dict:
    """REFERENCE.md E: one forward+backward (no optimizer) at 5 small sizes, a line fitted to driver memory,
    the size at 60 % of the limit. Re-implemented here, not Ultralytics' code."""
    backend, model, sizes, peaks = case.backend(), case.model(), [1, 2, 4, 8, 16], []
    with backend.session(case.limit):
        for size in sizes:
            backend.clear_cache()
            with backend.measure() as window:
                out = model(torch.randn(size, *case.shape))
                out.sum().backward()
                del out
            model.zero_grad(set_to_none=True)
            peaks.append(window.peak_bytes)
    slope, intercept = np.polyfit(sizes, peaks, 1)
    return {"batch_size": max(int((0.6 * case.limit - intercept) / slope), 1), "status": "ok", "steps": len(sizes)}


# --- follow-up ------------------------------------------------------------------------------------------------
def follow_up(case: Case, size: int) -> str:
    """20 training steps, a short last batch (a third) and 3 eval batches at ``size``, under the same limit.

    Shared with `benchmarks.gpu_suite`: inputs go to the case's device (the CPU for the simulation).
    """
    backend = case.backend()
    with make_workload(case.model(), device=backend.device, input_shape=case.shape) as workload:
        with backend.session(case.limit):
            backend.clear_cache()
            for i, batch in enumerate([size] * FOLLOW_UP_STEPS + [max(size // 3, 1)]):
                try:
                    workload.step(batch)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    workload.recover()
                    return f"OOM at step {i + 1}"
            workload.model.eval()
            try:
                with torch.no_grad():
                    for _ in range(3):
                        workload.model(torch.randn(size, *case.shape, device=backend.device))
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                return "OOM in eval"
            backend.synchronize()
    return "ok"


# --- one case -------------------------------------------------------------------------------------------------
def _timed(fn, *args) -> dict:
    began = time.perf_counter()
    row = fn(*args)
    row["wall_s"] = round(time.perf_counter() - began, 1)
    return row


def finders(case: Case) -> dict[str, dict]:
    rows = {
        "ours (memory)": _timed(ours, case),
        "ours (find_max)": _timed(ours, case, "memory", True),
        "ours (throughput)": _timed(ours, case, "throughput"),
    }
    for style in ("mps", "cuda"):
        for mode in ("power", "binsearch"):
            rows[f"lightning {mode} [{style} text]"] = _timed(lightning, case, mode, style)
        rows[f"accelerate [{style} text]"] = _timed(accelerate, case, style)
    rows["ultralytics-style (re-implemented)"] = _timed(ultralytics_style, case)
    return rows


def run_case(case: Case, issue_limit: float) -> dict:
    print(f"== {case.model_name} @ {case.image_size}, limit {case.limit / GiB:g} GiB", flush=True)
    began = time.perf_counter()
    truth = _timed(truths, case)
    print(f"   truth {truth}", flush=True)
    rows = finders(case)
    checked: dict[int, str] = {}
    for name, row in rows.items():
        size = row["batch_size"]
        if size is not None and size not in checked:
            checked[size] = follow_up(case, size)
        row["follow_up"] = checked.get(size, "-") if size is not None else "-"
        row["ratio_to_max_truth"] = round(size / truth["max_truth"], 3) if size else None
        row["step_equivalents"] = round(row["wall_s"] / truth["step_s_at_budget_truth"], 1)
        if name.startswith("ours"):
            row["ratio_to_budget_truth"] = round(size / truth["budget_truth"], 3)
        print(f"   {name}: {row}", flush=True)
    limit_note = "as in the issue" if case.limit == int(issue_limit * GiB) else f"adjusted from {issue_limit} GiB"
    took = round(time.perf_counter() - began)
    print(f"   case took {took} s", flush=True)
    return {
        "wall_s": took,
        "model": case.model_name,
        "image_size": case.image_size,
        "limit_gib": case.limit / GiB,
        "limit_note": limit_note,
        "budget_gib": round(case.budget / GiB, 3),
        "truth": truth,
        "finders": rows,
    }


# --- output ---------------------------------------------------------------------------------------------------
def _cell(value) -> str:
    return "-" if value is None else str(value)


def goals(case: dict) -> dict[str, str]:
    """Issue #5's goals for ours, checked against this case's numbers."""
    rows, truth = case["finders"], case["truth"]
    ours, exact, binsearch = rows["ours (memory)"], rows["ours (find_max)"], rows["lightning binsearch [cuda text]"]
    share = ours["wall_s"] / binsearch["wall_s"]
    equivalents, ratio, found_max = ours["step_equivalents"], ours["ratio_to_budget_truth"], exact["max_batch_size"]

    def verdict(met: bool) -> str:
        return "yes" if met else "NO"

    return {
        "<= 3 step-equivalents": f"{equivalents} {verdict(equivalents <= 3)}",
        "<= 1/3 of Lightning binsearch's wall time": f"{share:.2f} {verdict(share <= 1 / 3)}",
        ">= 95% of the budget truth": f"{ratio} {verdict(ratio >= 0.95)}",
        "find_max within one size of the max truth": f"{found_max} vs {truth['max_truth']} "
        + verdict(abs(found_max - truth["max_truth"]) <= 1),
        "0 OOMs in the follow-up": verdict(ours["follow_up"] == "ok"),
    }


def _status(row: dict) -> str:
    status = row.get("status", "ok")
    return status if status == "ok" else status.split(" (")[0].split(".")[0]  # the error's first clause


_NUMBERS = [
    ("batch size", "batch_size"),
    ("/ max truth", "ratio_to_max_truth"),
    ("/ budget truth", "ratio_to_budget_truth"),
    ("largest verified", "max_batch_size"),
    ("wall s", "wall_s"),
    ("steps", "steps"),
    ("step-equiv.", "step_equivalents"),
]


def finder_table(finders: dict[str, dict]) -> list[str]:
    """The markdown table of a case's finders, a row each, "-" where a finder reported nothing (also gpu_suite's)."""
    lines = [
        "| finder | " + " | ".join(header for header, _ in _NUMBERS) + " | follow-up | status |",
        "|---|" + "---:|" * len(_NUMBERS) + "---|---|",
    ]
    for name, row in finders.items():
        cells = [*(row.get(key) for _, key in _NUMBERS), row.get("follow_up"), _status(row)]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def markdown(report: dict) -> str:
    lines = [
        f"# Batch-size finders compared on a simulated Mac ({report['date']})",
        "",
        f"Machine: {report['machine']}. Command: `{report['command']}` (cases: {report.get('total_wall_s')} s in all).",
        "",
        "Step-equivalents = finder wall time / one training step at the budget-truth size (same run). "
        "Steps: real training (and, for Lightning, validation) steps.",
        "",
    ]
    for case in report["cases"]:
        t = case["truth"]
        lines += [
            f"## {case['model']} @ {case['image_size']} px, limit {case['limit_gib']:g} GiB "
            f"({case['limit_note']}), budget {case['budget_gib']} GiB",
            "",
            f"Max truth {t['max_truth']}, budget truth {t['budget_truth']}, one step at the budget truth "
            f"{t['step_s_at_budget_truth']} s (truth search: {t['truth_steps']} steps, {t['wall_s']} s).",
            "",
            *finder_table(case["finders"]),
        ]
        lines += ["", "Goals for ours: " + "; ".join(f"{k}: {v}" for k, v in goals(case).items()) + ".", ""]
    return "\n".join(lines)


def readme_table(report: dict) -> str:
    """The README's Performance table: one row per case, ours against the peers' answers and costs."""
    lines = [
        "| case (simulated limit) | budget / max truth | ours: size (÷ budget truth), step-eq., steps "
        "| ours find_max | Lightning power / binsearch (CUDA text) | Accelerate from 512 | Ultralytics-style |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        t, r = case["truth"], case["finders"]
        ours, exact = r["ours (memory)"], r["ours (find_max)"]
        power, binsearch = r["lightning power [cuda text]"], r["lightning binsearch [cuda text]"]
        accel, ultra = r["accelerate [cuda text]"], r["ultralytics-style (re-implemented)"]
        oom = {True: ", OOM in follow-up", False: ""}
        lines.append(
            f"| {case['model']} @ {case['image_size']} ({case['limit_gib']:g} GiB) "
            f"| {t['budget_truth']} / {t['max_truth']} "
            f"| **{ours['batch_size']}** ({ours['ratio_to_budget_truth']}), "
            f"{ours['step_equivalents']}, {ours['steps']} "
            f"| {exact['max_batch_size']}, {exact['step_equivalents']} step-eq. "
            f"| {power['batch_size']} ({power['step_equivalents']}) / {binsearch['batch_size']} "
            f"({binsearch['step_equivalents']}) step-eq. "
            f"| {accel['batch_size']} ({accel['step_equivalents']}){oom[accel['follow_up'] != 'ok']} "
            f"| {ultra['batch_size']}{oom[ultra['follow_up'] != 'ok']} |"
        )
    return "\n".join(lines)


def write(report: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare_finders.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "compare_finders.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run only the first case")
    parser.add_argument(
        "--keep", action="store_true", help="keep the cases already in the saved .json (same model, size and limit)"
    )
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the saved .json")
    parser.add_argument("--readme", action="store_true", help="print the README's table from the saved .json")
    args = parser.parse_args()
    if args.markdown_only or args.readme:
        saved = json.loads((RESULTS / "compare_finders.json").read_text())
        if args.readme:
            print(readme_table(saved))
        else:
            write(saved)
        return
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    report = {
        "date": date.today().isoformat(),
        "command": COMMAND + (" --quick" if args.quick else "") + (" --keep" if args.keep else ""),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "cases": [],
    }
    kept = json.loads((RESULTS / "compare_finders.json").read_text())["cases"] if args.keep else []
    for model, size, limit, issue_limit in CASES[:1] if args.quick else CASES:
        same = [c for c in kept if (c["model"], c["image_size"], c["limit_gib"]) == (model, size, limit)]
        report["cases"].append(same[0] if same else run_case(Case(model, size, limit), issue_limit))
        report["total_wall_s"] = sum(case["wall_s"] for case in report["cases"])
        write(report)


if __name__ == "__main__":
    main()
