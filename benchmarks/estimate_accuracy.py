"""How close `autobatch estimate` (a dry run on fake tensors) comes to the measured tensor peak of real steps.

    python -m benchmarks.estimate_accuracy        # writes benchmarks/results/estimate_accuracy.{json,md}

The measurement runs the same training step for real on the CPU and counts live tensor bytes storage by
storage (`mps_autobatch.estimate.measure_peak`), the second step of two so the optimizer state exists.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from datetime import date
from pathlib import Path

import timm
import torch

from mps_autobatch.estimate import estimate_peak, measure_peak

RESULTS = Path(__file__).parent / "results"
CASES = [  # (model, image size, batch size)
    ("resnet18", 96, 64),
    ("efficientnet_b0", 128, 16),
    ("vit_small_patch16_224", 224, 8),
]


def main() -> None:
    rows = []
    for name, image_size, batch_size in CASES:
        torch.manual_seed(0)
        factory = functools.partial(timm.create_model, name, num_classes=10)
        shape = (3, image_size, image_size)
        began = time.perf_counter()
        estimated = estimate_peak(factory, input_shape=shape, batch_size=batch_size, num_classes=10).peak_bytes
        estimate_s = time.perf_counter() - began
        began = time.perf_counter()
        measured = measure_peak(factory(), input_shape=shape, batch_size=batch_size, num_classes=10)
        measure_s = time.perf_counter() - began
        rows.append(
            {
                "model": name,
                "image_size": image_size,
                "batch_size": batch_size,
                "estimated_bytes": estimated,
                "measured_bytes": measured,
                "error": round((estimated - measured) / measured, 4),
                "estimate_s": round(estimate_s, 2),
                "measure_s": round(measure_s, 2),
            }
        )
        print(rows[-1], flush=True)
    report = {"date": date.today().isoformat(), "machine": platform.machine(), "torch": torch.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimate_accuracy.json").write_text(json.dumps(report, indent=2))
    table = "\n".join(
        f"| {r['model']} | {r['image_size']} | {r['batch_size']} | {r['estimated_bytes'] / 2**20:.1f} | "
        f"{r['measured_bytes'] / 2**20:.1f} | {r['error']:+.2%} | {r['estimate_s']} | {r['measure_s']} |"
        for r in rows
    )
    (RESULTS / "estimate_accuracy.md").write_text(
        f"# Dry-run estimate vs measured tensor peak ({report['date']}, {report['machine']}, "
        f"torch {report['torch']})\n\n"
        "Command: `python -m benchmarks.estimate_accuracy`. AdamW, one steady-state training step.\n\n"
        "| model | image | batch | estimated MiB | measured MiB | error | estimate s | measure s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
