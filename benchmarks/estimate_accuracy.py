"""How close `autobatch estimate` (a dry run on fake tensors) comes to the measured tensor peak of real steps,
and how close its calibrated prediction comes to a device's peak away from where it was calibrated.

    python -m benchmarks.estimate_accuracy        # writes benchmarks/results/estimate_accuracy.{json,md}

The dry-run part runs the same training step for real on the CPU and counts live tensor bytes storage by
storage (`mps_autobatch.estimate.measure_peak`), the second step of two so the optimizer state exists.

The calibration part, on the simulated Mac with each allocator variant: `mps_autobatch.estimate.calibrate` runs
real steps at c and 2c, and its prediction at 4c and 8c (the dry run with MPSAllocator's rules replayed, + a fixed
amount + an amount per sample) is compared with the device peak measured there (one step each, from an empty
cache, as a probe's trial reads it). Beside it, the two calibrations before it, from the same two readings: a line
over the dry run's tensors alone (tensors + fixed + per sample) and a single factor (the peak at c over the dry
run at c, times the dry run). The replay always uses the default rules, whatever the variant: it cannot know the
device's. On the "default" variant those rules are the simulated allocator's own code, and "flush-at-90" behaves
as "default" this far under its limit, so those rows check that the replay books the step's buffers as the device
does; the other three variants are where the rules and the device differ, and are counted apart.
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

from mps_autobatch.allocator import MPS_ALLOCATOR
from mps_autobatch.estimate import calibrate, estimate_grid, estimate_peak, measure_device_peaks, measure_peak
from mps_autobatch.simulate import ALLOCATOR_VARIANTS, SimulatedMPS, SimulatedMPSBackend

RESULTS = Path(__file__).parent / "results"
CASES = [  # (model, image size, batch size)
    ("resnet18", 96, 64),
    ("efficientnet_b0", 128, 16),
    ("vit_small_patch16_224", 224, 8),
]


# (model, image size, calibration size c): predictions at 4c and 8c.
CALIBRATION_CASES = [("resnet18", 96, 8), ("test_vit", 96, 32), ("mobilenetv3_small_100", 96, 8)]
MiB = 2**20
RULES_DIFFER = ("best-fit-2x", "pow2-heaps", "graph-per-shape")  # the variants whose rules are not the replay's


def _factory(name: str, image_size: int):
    extra = {"img_size": image_size} if name == "test_vit" else {}
    return functools.partial(timm.create_model, name, num_classes=10, **extra)


def calibration_rows() -> list[dict]:
    rows = []
    for name, image_size, c in CALIBRATION_CASES:
        torch.manual_seed(0)
        factory, shape = _factory(name, image_size), (3, image_size, image_size)
        sizes = [c, 2 * c, 4 * c, 8 * c]
        began = time.perf_counter()
        grid = estimate_grid(factory, input_shapes=[shape], batch_sizes=sizes, num_classes=10, allocator=MPS_ALLOCATOR)
        replay_s = time.perf_counter() - began
        dry = {e.batch_size: e for e in grid}
        for variant, allocator in ALLOCATOR_VARIANTS.items():
            backend = SimulatedMPSBackend(SimulatedMPS(16 * 2**30, allocator=allocator))
            began = time.perf_counter()
            line = calibrate(factory, backend, input_shape=shape, batch_size=c, num_classes=10)
            calibrate_s = time.perf_counter() - began
            (m1, m2), (t1, t2) = line.measured_bytes, (dry[c].peak_bytes, dry[2 * c].peak_bytes)
            factor = m1 / t1
            tensor_per_sample = ((m2 - t2) - (m1 - t1)) / c  # the line over tensors alone, from the same readings
            tensor_fixed = m1 - t1 - tensor_per_sample * c
            # Measured as calibrate measures, as a probe's trials read: one step each, from an empty cache.
            peaks = measure_device_peaks(
                factory, backend, input_shape=shape, batch_sizes=[4 * c, 8 * c], num_classes=10
            )
            for size, measured in zip((4 * c, 8 * c), peaks):
                tensors = dry[size].peak_bytes
                predictions = {
                    "calibrated": line.predict(dry[size]),
                    "tensor_line": tensors + tensor_fixed + tensor_per_sample * size,
                    "single_factor": factor * tensors,
                }
                row = {
                    "model": name,
                    "image_size": image_size,
                    "variant": variant,
                    "calibrated_at": c,
                    "batch_size": size,
                    "fixed_mib": round(line.fixed_bytes / MiB, 1),
                    "per_sample_mib": round(line.per_sample_bytes / MiB, 3),
                    "tensor_mib": round(tensors / MiB, 1),
                    "replayed_mib": round(dry[size].modelled_bytes / MiB, 1),
                    "measured_mib": round(measured / MiB, 1),
                    "calibrate_s": round(calibrate_s, 1),
                    "replay_s": round(replay_s, 1),
                }
                for key, value in predictions.items():
                    row[f"{key}_mib"] = round(value / MiB, 1)
                    row[f"{key}_error"] = round(value / measured - 1, 4)
                rows.append(row)
                print(rows[-1], flush=True)
    return rows


def calibration_table(rows: list[dict]) -> str:
    def met(key: str) -> int:
        return sum(abs(r[f"{key}_error"]) <= 0.10 for r in rows)

    differing = [r for r in rows if r["variant"] in RULES_DIFFER]
    met_differing = sum(abs(r["calibrated_error"]) <= 0.10 for r in differing)

    def worst(key: str) -> str:
        return f"{max(abs(r[f'{key}_error']) for r in rows):.1%}"

    replays = ", ".join(
        f"{model} {seconds} s" for model, seconds in dict.fromkeys((r["model"], r["replay_s"]) for r in rows)
    )
    lines = [
        "## Calibrated estimate vs the simulated Mac's device peak, away from the calibration size",
        "",
        f"Within 10 % at 4c and 8c: **{met('calibrated')} of {len(rows)}** predictions (the goal: all), worst "
        f"{worst('calibrated')}; the line over tensors alone: {met('tensor_line')} of {len(rows)}, worst "
        f"{worst('tensor_line')}; the single factor: {met('single_factor')} of {len(rows)}, worst "
        f"{worst('single_factor')}. On the variants whose rules differ from the replay's "
        f"({', '.join(RULES_DIFFER)}): {met_differing} of {len(differing)}; on the other two the simulated "
        "allocator runs the replay's own rules (flush-at-90 never reaches 90 % of this limit), so their rows check "
        f"the replay's booking. The dry run with the replay, four sizes: {replays}.",
        "",
        "| model @ image | allocator | c, 2c | beyond the model: fixed MiB + MiB per sample | batch | tensors MiB "
        "| replayed MiB | measured MiB | calibrated MiB (error) | tensor line MiB (error) | single factor MiB (error) "
        "| calibration s |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} @ {r['image_size']} | {r['variant']} | {r['calibrated_at']}, {2 * r['calibrated_at']} "
            f"| {r['fixed_mib']} + {r['per_sample_mib']} x batch | {r['batch_size']} | {r['tensor_mib']} "
            f"| {r['replayed_mib']} | {r['measured_mib']} "
            f"| {r['calibrated_mib']} ({r['calibrated_error']:+.1%}) "
            f"| {r['tensor_line_mib']} ({r['tensor_line_error']:+.1%}) "
            f"| {r['single_factor_mib']} ({r['single_factor_error']:+.1%}) | {r['calibrate_s']} |"
        )
    return "\n".join(lines) + "\n"


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
    calibrated = calibration_rows()
    report = {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
        "calibration": calibrated,
    }
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
        f"{table}\n\n" + calibration_table(calibrated)
    )


if __name__ == "__main__":
    main()
