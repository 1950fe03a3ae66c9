"""How close the default probe comes to the budget truth for efficientnet_b0 at 224 px on a simulated 16 GiB Mac.

    python -m benchmarks.core_simulated_mac            # writes benchmarks/results/core_simulated_mac.{json,md}

The budget truth is found by stepping every size upward from the recommended one, exactly as a trial
does, until one is over the budget (peak memory grows with the batch size here, so the first size over the
budget ends the search; sizes below the recommended one fit by the probe's own measurements).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import timm
import torch

from mps_autobatch import find_safe_batch_size
from mps_autobatch.simulate import simulated_backend
from mps_autobatch.workload import make_workload

RESULTS = Path(__file__).parent / "results"


def _budget_truth(model_name: str, image_size: int, spec: str, limit: int, budget: int, start: int) -> dict:
    torch.manual_seed(0)
    backend = simulated_backend(spec)
    model = timm.create_model(model_name, num_classes=1000)
    stepped = {}
    with make_workload(model, device=backend.device, input_shape=(3, image_size, image_size)) as workload:
        with backend.session(limit):
            backend.clear_cache()
            workload.warm_up(2)
            size = start
            while True:
                backend.clear_cache()
                began = time.perf_counter()
                with backend.measure() as window:
                    workload.step(size)
                stepped[size] = {"peak_bytes": window.peak_bytes, "step_s": time.perf_counter() - began}
                if window.peak_bytes > budget:
                    break
                size += 1
    truth = max(s for s, r in stepped.items() if r["peak_bytes"] <= budget)
    return {"budget_truth": truth, "stepped": stepped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--simulate", default="mps:16GiB")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000)
    began = time.perf_counter()
    result = find_safe_batch_size(
        model, input_shape=(3, args.image_size, args.image_size), device=simulated_backend(args.simulate)
    )
    probe_s = time.perf_counter() - began
    truth = _budget_truth(
        args.model, args.image_size, args.simulate, result.limit_bytes, result.budget_bytes, result.batch_size
    )
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": args.model,
        "image_size": args.image_size,
        "simulate": args.simulate,
        "probe_wall_s": round(probe_s, 1),
        "trials": [(t.batch_size, t.outcome, t.peak_bytes, round(t.step_s or 0, 2)) for t in result.trials],
        "recommended": result.batch_size,
        "budget_bytes": result.budget_bytes,
        "limit_bytes": result.limit_bytes,
        "limit_source": result.limit_source,
        **truth,
    }
    report["ratio"] = round(result.batch_size / truth["budget_truth"], 3)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core_simulated_mac.json").write_text(json.dumps(report, indent=2))
    rows = "\n".join(
        f"| {size} | {outcome} | {peak / 2**30:.2f} | {step_s} |" for size, outcome, peak, step_s in report["trials"]
    )
    (RESULTS / "core_simulated_mac.md").write_text(
        f"# {args.model} @ {args.image_size} px on a simulated Mac ({args.simulate}), {report['date']}\n\n"
        f"Machine: {report['machine']}. Command: `python -m benchmarks.core_simulated_mac`.\n\n"
        f"Limit {result.limit_bytes / 2**30:.2f} GiB ({result.limit_source}); "
        f"budget {result.budget_bytes / 2**30:.2f} GiB.\n\n"
        "| batch size | outcome | peak GiB | s/step |\n|---:|---|---:|---:|\n"
        f"{rows}\n\n"
        f"Recommended {result.batch_size} after {len(result.trials)} trials in {report['probe_wall_s']} s; "
        f"budget truth {truth['budget_truth']} (stepped up from the recommended size); ratio {report['ratio']}.\n"
    )
    print(json.dumps({k: report[k] for k in ("recommended", "budget_truth", "ratio", "probe_wall_s")}))


if __name__ == "__main__":
    main()
