"""Train and eval batch sizes of two small text models at two sequence lengths, on a simulated 16 GiB Mac.

    python -m benchmarks.text_model_sizes      # writes benchmarks/results/text_model_sizes.{json,md}

Each case probes dict inputs (`example=` one tokenised sample) in train and in eval mode, then finds the budget
truth above the answer, each size run exactly as a trial does (fresh simulated device, the same model): sizes
answer+1, +2, +4, ... until one is over the budget, then bisection between the last that fit and it (peak
memory grows with the batch size for these models). The models are the test suite's (`tests/token_models.py`): a 2-layer
encoder classifier (its loss from ``loss_fn(output, batch)``) and a small causal LM returning ``.loss``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from mps_autobatch import find_safe_batch_size
from mps_autobatch._units import parse_size
from mps_autobatch.simulate import simulated_backend
from mps_autobatch.workload import make_workload

RESULTS = Path(__file__).parent / "results"
SIMULATE = "mps:16GiB"


def _models() -> dict:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from token_models import EncoderClassifier, TinyCausalLM, classifier_loss, token_sample

    return {
        "encoder-classifier": (EncoderClassifier, classifier_loss, lambda n: token_sample(n)),
        "causal-lm": (TinyCausalLM, None, lambda n: token_sample(n, labels="lm")),
    }


def _truth(make_model, loss_fn, example, mode: str, limit: int, budget: int, start: int) -> int:
    torch.manual_seed(0)
    backend = simulated_backend(SIMULATE)
    workload = make_workload(make_model(), device=backend.device, example=example, loss_fn=loss_fn, mode=mode)
    with workload, backend.session(limit):
        backend.clear_cache()
        workload.warm_up(2)

        def fits(size: int) -> bool:
            backend.clear_cache()
            with backend.measure() as window:
                workload.step(size)
            return window.peak_bytes is not None and window.peak_bytes <= budget

        lo, step = start, 1
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step  # over the budget
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-limit", default="256MiB")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()
    limit = parse_size(args.memory_limit)
    rows = []
    for name, (make_model, loss_fn, sample) in _models().items():
        for length in args.lengths:
            for mode in ("train", "eval"):
                torch.manual_seed(0)
                example = sample(length)
                began = time.perf_counter()
                result = find_safe_batch_size(
                    make_model(),
                    example=example,
                    loss_fn=loss_fn,
                    mode=mode,
                    device=simulated_backend(SIMULATE),
                    memory_limit=limit,
                )
                seconds = time.perf_counter() - began
                truth = _truth(make_model, loss_fn, example, mode, limit, result.budget_bytes, result.batch_size)
                rows.append(
                    {
                        "model": name,
                        "length": length,
                        "mode": mode,
                        "batch_size": result.batch_size,
                        "budget_truth": truth,
                        "of_truth": round(result.batch_size / truth, 3) if truth else None,
                        "trials": [t.batch_size for t in result.trials],
                        "probe_s": round(seconds, 2),
                        "strategy": result.strategy,
                    }
                )
                print(rows[-1], flush=True)
    report = {
        "command": "python -m benchmarks.text_model_sizes" + (f" --memory-limit {args.memory_limit}"),
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "simulate": SIMULATE,
        "memory_limit_bytes": limit,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "text_model_sizes.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Text models: train and eval batch sizes ({SIMULATE}, limit {args.memory_limit}, headroom 20 %)",
        "",
        f"Command: `{report['command']}`, {report['date']}, torch {report['torch']}, compute on this CPU.",
        "Budget truth: the largest size whose step fits the budget, searched above the answer (gallop, then bisect).",
        "",
        "| model | length | mode | batch size | budget truth | of truth | trials | probe s |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        trials = ", ".join(map(str, r["trials"]))
        lines.append(
            f"| {r['model']} | {r['length']} | {r['mode']} | {r['batch_size']} | {r['budget_truth']} | "
            f"{r['of_truth']} | {trials} ({len(r['trials'])}) | {r['probe_s']} |"
        )
    (RESULTS / "text_model_sizes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
