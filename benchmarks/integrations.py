"""The Lightning callback and the HF Trainer hook next to Lightning's own finder and ``auto_find_batch_size``.

    python -m benchmarks.integrations      # writes benchmarks/results/integrations.{json,md}

Everything runs on a simulated 16 GiB Mac (compute on this CPU), the same model for each pair, in one run:

- Lightning: the test suite's 256-2048-2048-10 MLP (`tests/lightning_targets.py`), 256 MiB. Ours with
  ``requested=4096`` and an eval size; Lightning's ``BatchSizeFinder`` (power mode, its defaults) on the MPS error
  text and, because it does not recognise that text, again on a simulation that raises CUDA's text. Then two
  training steps at each answer under the same cap: does it fit?
- HF Trainer: the tests' tiny BERT classifier (`tests/hf_targets.py`) on 256 mixed-length samples, 1 GiB, per-device
  128 x accumulation 1. ``auto_find_batch_size=True`` trains for 4 updates and is timed; ours probes, then trains the
  same 4 updates.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch

from mps_autobatch._units import parse_size
from mps_autobatch.simulate import simulated_backend

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def _fits(make_trainer: Any, module: Any, spec: str, limit: int) -> dict[str, Any]:
    """Two training steps at the module's batch size under the cap: ok, or the out-of-memory line."""
    backend = simulated_backend(spec)
    trainer = make_trainer()
    with backend.session(limit):
        backend.sim.reset_high_water()
        try:
            trainer.fit(module)
            return {"fits": True, "high_water_bytes": backend.sim.high_water_bytes}
        except RuntimeError as exc:
            return {"fits": False, "error": str(exc).splitlines()[0][:160]}


def lightning_case(limit_text: str) -> list[dict[str, Any]]:
    from lightning.pytorch.callbacks import BatchSizeFinder as LightningFinder
    from lightning_targets import MLP, trainer

    from mps_autobatch.lightning import BatchSizeFinder

    limit = parse_size(limit_text)
    rows = []
    folder = tempfile.mkdtemp()

    # Ours: the effective batch 4,096 kept, an eval size apart.
    module = MLP()
    ours = BatchSizeFinder(
        requested=4096, device=simulated_backend("mps:16GiB"), memory_limit=limit, eval_batch_arg_name="eval_batch_size"
    )
    began = time.perf_counter()
    run = trainer([ours], folder, max_steps=1)
    run.fit(module)
    seconds = time.perf_counter() - began
    assert ours.result is not None and ours.plan is not None and ours.eval_result is not None
    follow = _fits(
        lambda: trainer([], folder, max_steps=2, accumulate_grad_batches=ours.plan.accumulation),
        MLP(batch_size=ours.plan.micro),
        "mps:16GiB",
        limit,
    )
    rows.append(
        {
            "integration": "lightning",
            "finder": "mps_autobatch BatchSizeFinder(requested=4096)",
            "error_text": "MPS",
            "train_batch_size": ours.plan.micro,
            "accumulation": ours.plan.accumulation,
            "effective_batch": ours.plan.micro * ours.plan.accumulation,
            "eval_batch_size": ours.eval_result.batch_size,
            "largest_safe": ours.result.batch_size,
            "trials": len(ours.result.trials) + len(ours.eval_result.trials),
            "ooms": sum(not t.ok for t in ours.result.trials),
            "seconds": round(seconds, 1),
            "follow_up": follow,
            "note": ours.plan.note,
        }
    )

    # Lightning's own finder, on the MPS text and on the CUDA text.
    for spec, text in (("mps:16GiB", "MPS"), ("mps-cuda-text:16GiB", "CUDA")):
        backend = simulated_backend(spec)
        module = MLP(batch_size=2)
        theirs = LightningFinder(mode="power")
        began = time.perf_counter()
        row: dict[str, Any] = {
            "integration": "lightning",
            "finder": "lightning BatchSizeFinder(mode='power')",
            "error_text": text,
        }
        with backend.session(limit):
            try:
                trainer([theirs], folder, max_steps=1, limit_val_batches=1).fit(module)
                row |= {
                    "train_batch_size": theirs.optimal_batch_size,
                    "accumulation": 1,
                    "effective_batch": theirs.optimal_batch_size,
                }
            except Exception as exc:  # what a user sees: the run stops
                row |= {"train_batch_size": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"}
        # The module records the size of every training_step it ran: the finder's trials, then the fit's own.
        row |= {"seconds": round(time.perf_counter() - began, 1), "forwards": len(module.seen)}
        row |= {"trials": len(set(module.seen)), "sizes_tried": list(dict.fromkeys(module.seen))}
        if row.get("train_batch_size"):
            row["follow_up"] = _fits(
                lambda: trainer([], folder, max_steps=2), MLP(batch_size=row["train_batch_size"]), "mps:16GiB", limit
            )
        rows.append(row)
    return rows


def hf_case(limit_text: str) -> list[dict[str, Any]]:
    from hf_targets import bert_trainer
    from transformers.utils import logging as hf_logging

    from mps_autobatch.transformers import tune_trainer

    hf_logging.set_verbosity_error()
    limit = parse_size(limit_text)
    rows = []

    # auto_find_batch_size: train 4 updates from 128, restarting at 0.9x after each out-of-memory error.
    backend = simulated_backend("mps:16GiB")
    trainer = bert_trainer(tempfile.mkdtemp(), per_device=128, accumulation=1, auto_find_batch_size=True, max_steps=4)
    seen: list[int] = []
    trainer.model.register_forward_pre_hook(lambda _, a, k: seen.append(len(k["input_ids"])), with_kwargs=True)
    began = time.perf_counter()
    row: dict[str, Any] = {"integration": "hf", "finder": "TrainingArguments(auto_find_batch_size=True)"}
    with backend.session(limit):
        try:
            trainer.train()
            settled = trainer._train_batch_size
            row |= {
                "train_batch_size": settled,
                "accumulation": trainer.args.gradient_accumulation_steps,
                "effective_batch": settled * trainer.args.gradient_accumulation_steps,
            }
        except Exception as exc:
            row |= {"train_batch_size": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:140]}"}
    sizes = list(dict.fromkeys(seen))  # in order; an epoch's last, partial batch shows as a size of its own
    settled = row.get("train_batch_size")
    row |= {
        "seconds": round(time.perf_counter() - began, 1),
        # Restarts: the sizes above the settled one it gave up (a smaller one before it is a partial last batch).
        "ooms": len([s for s in sizes[: sizes.index(settled)] if s > settled]) if settled in sizes else None,
        "sizes_tried": sizes,
        "eval_batch_size": trainer.args.per_device_eval_batch_size,
        "largest_safe": None,
    }
    rows.append(row)

    # Ours: probe, then the same 4 updates.
    backend = simulated_backend("mps:16GiB")
    trainer = bert_trainer(tempfile.mkdtemp(), per_device=128, accumulation=1, max_steps=4)
    began = time.perf_counter()
    result = tune_trainer(trainer, device=backend, memory_limit=limit)
    probe_s = time.perf_counter() - began
    a = trainer.args
    with backend.session(limit):
        try:
            trainer.train()
            fits = {"fits": True}
        except RuntimeError as exc:
            fits = {"fits": False, "error": str(exc).splitlines()[0][:160]}
    rows.append(
        {
            "integration": "hf",
            "finder": "mps_autobatch tune_trainer(trainer)",
            "train_batch_size": a.per_device_train_batch_size,
            "accumulation": a.gradient_accumulation_steps,
            "effective_batch": a.per_device_train_batch_size * a.gradient_accumulation_steps,
            "eval_batch_size": a.per_device_eval_batch_size,
            "largest_safe": result.batch_size,
            "trials": len(result.trials),
            "ooms": sum(not t.ok for t in result.trials),
            "probe_seconds": round(probe_s, 1),
            "seconds": round(time.perf_counter() - began, 1),
            "follow_up": fits,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lightning-limit", default="256MiB")
    parser.add_argument("--hf-limit", default="1GiB")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.manual_seed(0)
    rows = lightning_case(args.lightning_limit) + hf_case(args.hf_limit)
    report = {
        "command": "python -m benchmarks.integrations",
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "limits": {"lightning": args.lightning_limit, "hf": args.hf_limit},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "integrations.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# The integrations next to Lightning's finder and auto_find_batch_size (simulated 16 GiB Mac)",
        "",
        f"Command: `{report['command']}`, {report['date']}, torch {report['torch']}, compute on this CPU. Lightning: "
        f"MLP 256-2048-2048-10 at {args.lightning_limit}; HF: tiny BERT (2 layers, 64 wide) at {args.hf_limit}.",
        "",
        "| integration | finder | error text | train batch | accumulation | effective | eval batch | trials | OOMs | s "
        "| a fit at it | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        follow = r.get("follow_up")
        fit = "" if follow is None else ("fits" if follow.get("fits") else f"OOM: {follow.get('error', '')[:60]}")
        note = r.get("error") or r.get("note") or (f"sizes tried {r['sizes_tried']}" if r.get("sizes_tried") else "")
        lines.append(
            f"| {r['integration']} | {r['finder']} | {r.get('error_text', '')} | {r.get('train_batch_size')} | "
            f"{r.get('accumulation', '')} | {r.get('effective_batch', '')} | {r.get('eval_batch_size', '')} | "
            f"{r.get('trials', '')} | {r.get('ooms', '')} | {r['seconds']} | {fit} | {note} |"
        )
    (RESULTS / "integrations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
